"""Checkpoint I/O: official layout round trips and clear errors on bad checkpoints."""

import json
import shutil

import pytest
import torch

from sclens.errors import CheckpointError
from sclens.models import load_scgpt, save_scgpt
from tests import official_reference as ref


@pytest.fixture()
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ref.FIXTURE / "model", d)
    return d


def _rewrite(d, fn):
    sd = torch.load(d / "best_model.pt", weights_only=True)
    torch.save(fn(sd), d / "best_model.pt")


def test_save_load_round_trip_uses_official_names(tiny_model, tmp_path):
    save_scgpt(tiny_model, tmp_path / "m")
    sd = torch.load(tmp_path / "m" / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in sd
    assert "transformer_encoder.layers.1.norm2.bias" in sd and "encoder.embedding.weight" in sd
    args = json.loads((tmp_path / "m" / "args.json").read_text())
    assert args["nheads"] == 4 and args["embsize"] == 32 and args["nlayers"] == 2
    back = load_scgpt(tmp_path / "m")
    for (k1, a), (k2, b) in zip(tiny_model.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)


@pytest.mark.parametrize("style", ["in_proj_", "_impl.Wqkv.", "module_prefix"])
def test_alternative_key_names_load_identically(ckpt, style):
    ref_model = load_scgpt(ckpt)

    def rename(sd):
        if style == "module_prefix":
            return {f"module.{k}": v for k, v in sd.items()}
        if style == "_impl.Wqkv.":
            return {k.replace("self_attn.Wqkv.", "self_attn._impl.Wqkv.").replace("self_attn.out_proj.",
                    "self_attn._impl.out_proj."): v for k, v in sd.items()}
        return {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in sd.items()}

    _rewrite(ckpt, rename)
    other = load_scgpt(ckpt)
    for a, b in zip(ref_model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_file_lists_what_was_found(ckpt):
    (ckpt / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['vocab.json'\].*found"):
        load_scgpt(ckpt)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_scgpt(tmp_path / "nope")


def test_truncated_checkpoint(ckpt):
    data = (ckpt / "best_model.pt").read_bytes()
    (ckpt / "best_model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_scgpt(ckpt)


def test_empty_checkpoint(ckpt):
    (ckpt / "best_model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_scgpt(ckpt)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/sclens_pwned",))


def test_pickle_with_code_is_refused(ckpt, tmp_path):
    sd = torch.load(ckpt / "best_model.pt", weights_only=True)
    sd["payload"] = _Evil()
    torch.save(sd, ckpt / "best_model.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_scgpt(ckpt)
    import os

    assert not os.path.exists("/tmp/sclens_pwned")


def test_args_without_nheads(ckpt):
    args = json.loads((ckpt / "args.json").read_text())
    del args["nheads"]
    (ckpt / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="nheads"):
        load_scgpt(ckpt)


def test_args_not_json(ckpt):
    (ckpt / "args.json").write_text("{embsize: 32")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_scgpt(ckpt)


def test_wrong_embsize_is_caught(ckpt):
    args = json.loads((ckpt / "args.json").read_text())
    args["embsize"] = 64
    (ckpt / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="embsize=64"):
        load_scgpt(ckpt)


def test_wrong_d_hid_is_a_shape_error_not_random_weights(ckpt):
    args = json.loads((ckpt / "args.json").read_text())
    args["d_hid"] = 64
    (ckpt / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_scgpt(ckpt)


def test_missing_encoder_tensor(ckpt):
    _rewrite(ckpt, lambda sd: {k: v for k, v in sd.items() if "layers.1.linear1" not in k})
    with pytest.raises(CheckpointError, match="lacks encoder tensors"):
        load_scgpt(ckpt)


def test_fine_tuning_modules_are_refused_unless_allowed(ckpt):
    _rewrite(ckpt, lambda sd: {**sd, "dsbn.bns.0.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match="fine-tuning modules"):
        load_scgpt(ckpt)
    with pytest.warns(UserWarning, match="ignoring unsupported"):
        load_scgpt(ckpt, allow_unsupported=True)


def test_vocab_from_another_model(ckpt):
    (ckpt / "vocab.json").write_text(json.dumps({f"G{i}": i for i in range(500)}))
    with pytest.raises(CheckpointError, match="does not belong"):
        load_scgpt(ckpt)
