"""warmup() and `python -m compressed_comm warmup`: every kernel variant runs ahead of time."""

import pytest
import torch

import compressed_comm
from compressed_comm.__main__ import main
from compressed_comm.kernels import numba_cpu


def test_warmup_compiles_the_kernels_each_codec_uses():
    results = compressed_comm.warmup(dtypes=[torch.float16], codecs=["binary", "int2"])
    assert [(r.codec, r.dtype, r.kernels) for r in results] == [
        ("binary", torch.float16, "numba"), ("int2", torch.float16, "numba")]
    assert all(r.seconds >= 0 for r in results)
    # every variant a stream or a stateless call can need exists now: with and without a
    # prediction, with and without a reference to update, rows packed in place or flat
    fp16 = [sig for sig in numba_cpu._binary_rows.signatures if str(sig[0].dtype) == "uint16"]
    preds = {str(sig[1]) for sig in fp16}
    refs = {str(sig[2]) for sig in fp16}
    assert "none" in preds and any("array" in p for p in preds)
    assert "none" in refs and any("array" in r for r in refs)
    assert numba_cpu._pack_flat.signatures and numba_cpu._int2_apply.signatures


def test_warmup_rejects_a_bad_codec_before_any_work():
    with pytest.raises(ValueError, match="unknown codec 'zstd'"):
        compressed_comm.warmup(codecs=["zstd"])


def test_cli_warms_and_reports(capsys):
    assert main(["warmup", "--codecs", "int8", "--dtypes", "bfloat16,float32"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "bfloat16" in out and "float32" in out and "warm in" in out


@pytest.mark.parametrize("args, message", [
    (["warmup", "--dtypes", "float64"], "unknown dtype 'float64'"),
    (["warmup", "--codecs", "int3"], "unknown codec 'int3'"),
])
def test_cli_bad_arguments_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
