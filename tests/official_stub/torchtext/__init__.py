"""Test-only stand-in for the parts of torchtext that scgpt 0.2.4 imports.

torchtext 0.18 is binary-incompatible with torch >= 2.4, so the official scGPT package cannot import it
here. scGPT only uses ``torchtext.vocab.Vocab`` and the ``vocab()`` factory; this package provides that
surface and nothing else. Never imported by sclens itself.
"""
