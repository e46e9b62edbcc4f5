"""Triton GPU segment attention, on CPU.

1. The @triton.jit kernels of `mmv_jax.kernels.triton_gpu` run under Triton's interpreter
   (TRITON_INTERPRET=1, CPU torch tensors) and equal the dense reference (fp32), forward and
   backward (dQ, dK, dV), on packed rows with padding, one-token segments, segments crossing
   block boundaries and a one-segment row. fp32 and fp16 (Triton 3.x's interpreter computes
   bf16 `tl.dot` wrongly, so bf16 parity is left to tools/device_check.py on a GPU).
2. `jax.export(..., platforms=["cuda"])` of the jax-triton call (forward + gradients) lowers
   and compiles the kernels to PTX for sm_90 — needs jax-triton and the CUDA jaxlib plugin
   (`pip install --no-deps jax-cuda12-plugin==<jaxlib version>`; jax-cuda12-pjrt is not needed).

TRITON_INTERPRET must be set before triton decorates the kernels, so each part runs in a
subprocess of this very file (`python tests/test_kernels_triton.py interp|export`), which
prints one JSON line per case.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

S, H = 256, 2


def _layouts(s=S):
    rows = np.zeros((3, s), np.int32)
    pos, sid = 0, 0
    for n in (100, 1, 60, 1, 1, 50):  # crosses the 64/128 block edges; pad tail
        sid += 1
        rows[0, pos : pos + n] = sid
        pos += n
    rows[1, :] = np.arange(1, s + 1)  # one-token segments ...
    rows[1, 70:140] = 0  # ... and a padding run in the middle
    rows[2, :] = 5  # one segment fills the row
    return rows


# ----------------------------------------------------------------------------- child: interpreter


def _poison_layout():
    """One row whose third 64-token block is all padding: NaN there must never be read."""
    seg = np.zeros((1, S), np.int32)
    seg[0, :100] = 1
    seg[0, 100:128] = 2
    seg[0, 192:] = 3
    return seg


def _over_bound_layout():
    """Segments far longer than the bound the XLA/Pallas tests promise (60): the kernel walks each
    block's span from the data, so it needs no bound and must stay exact."""
    seg = np.zeros((2, S), np.int32)
    seg[0, :230] = 1
    seg[1, :10], seg[1, 10:250] = 1, 2
    return seg


def _child_interp():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import torch

    from mmv_jax.kernels import triton_gpu as tg
    from mmv_jax.kernels.reference import segment_attention_reference

    def meta(seg, bm, bn):
        return [torch.tensor(np.asarray(m)) for m in tg.block_metadata(jnp.asarray(seg), bm, bn)]

    def reference(q, k, v, seg, do):
        """Output and (dq, dk, dv) of the dense definition in fp32."""
        o, vjp = jax.vjp(
            lambda q, k, v: segment_attention_reference(q, k, v, jnp.asarray(seg)),
            *(jnp.asarray(x.float().numpy()) for x in (q, k, v)),
        )
        return [np.asarray(x, np.float64) for x in (o, *vjp(jnp.asarray(do.float().numpy())))]

    def run(seg, q, k, v, do):
        b, s = seg.shape
        d = q.shape[-1]
        segt = torch.tensor(seg)
        fmeta = meta(seg, tg.BLOCK_M, tg.BLOCK_N)
        bmeta = meta(seg, tg.BLOCK_M_BWD, tg.BLOCK_N_BWD)
        common = dict(
            SM_SCALE=1.0 / np.sqrt(d), SEQ=s, NHEADS=H, HEAD_DIM=d, IEEE=q.dtype == torch.float32
        )
        o = torch.empty_like(q)
        lse = torch.empty((b, H, s), dtype=torch.float32)
        tg._fwd_kernel[(s // tg.BLOCK_M, b * H)](
            q, k, v, segt, *fmeta[4:6], o, lse, BM=tg.BLOCK_M, BN=tg.BLOCK_N, **common
        )
        delta = torch.einsum("bshd,bshd->bhs", do.float(), o.float()).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bw = dict(BM=tg.BLOCK_M_BWD, BN=tg.BLOCK_N_BWD, **common)
        tg._bwd_dq_kernel[(s // tg.BLOCK_M_BWD, b * H)](
            q, k, v, segt, *bmeta[4:6], do, lse, delta, dq, **bw
        )
        tg._bwd_dkv_kernel[(s // tg.BLOCK_N_BWD, b * H)](
            q, k, v, segt, *bmeta[6:], do, lse, delta, dk, dv, **bw
        )
        return o, dq, dk, dv

    cases = [
        ("fp32_d64", torch.float32, 64, 1e-4, None, False),
        ("fp16_d64", torch.float16, 64, None, 2e-2, False),
        ("fp16_d128", torch.float16, 128, None, 2e-2, False),
        ("fp32_poisoned_padding_block", torch.float32, 64, 1e-4, None, True),
        ("fp32_segment_over_bound", torch.float32, 64, 1e-4, None, "over_bound"),
    ]
    rng = np.random.default_rng(0)
    for name, dt, d, atol, rtol, poison in cases:
        try:
            seg = (
                _over_bound_layout()
                if poison == "over_bound"
                else _poison_layout()
                if poison
                else _layouts()
            )
            b, s = seg.shape
            q, k, v, do = (
                torch.tensor(rng.standard_normal((b, s, H, d)), dtype=torch.float32).to(dt)
                for _ in range(4)
            )
            want = reference(q, k, v, seg, do)
            if poison is True:
                for x in (q, k, v):
                    x[:, 128:192] = float("nan")
            got_all = run(seg, q, k, v, do)
            errs = {}
            for label, got, ref in zip(("o", "dq", "dk", "dv"), got_all, want):
                g = got.double().numpy()
                if not np.isfinite(g).all():
                    raise AssertionError(f"{label}: non-finite values")
                if atol is not None:
                    errs[label] = float(np.abs(g - ref).max())
                    ok = errs[label] <= atol
                else:
                    errs[label] = float(np.linalg.norm(g - ref) / np.linalg.norm(ref))
                    ok = errs[label] <= rtol
                if not ok:
                    raise AssertionError(
                        f"{label}: error {errs[label]:.3g} over tolerance ({errs})"
                    )
                if np.abs(g[seg == 0]).max() != 0.0:
                    raise AssertionError(f"{label}: padding tokens are not exactly zero")
            print(json.dumps({"case": name, "ok": True, "msg": errs}), flush=True)
        except Exception as e:  # report every case, do not stop at the first
            print(
                json.dumps({"case": name, "ok": False, "msg": f"{type(e).__name__}: {e}"}),
                flush=True,
            )


# ----------------------------------------------------------------------------- child: cuda export


def _decode_mlir_strings(text):
    """Bytes of every string literal in MLIR text (\\XX hex escapes)."""
    import re

    out = []
    for lit in re.findall(r'"((?:[^"\\]|\\[0-9A-Fa-f]{2}|\\\\)*)"', text):
        buf, i = bytearray(), 0
        while i < len(lit):
            if lit[i] == "\\" and lit[i + 1 : i + 2] == "\\":
                buf.append(0x5C)
                i += 2
            elif lit[i] == "\\":
                buf.append(int(lit[i + 1 : i + 3], 16))
                i += 3
            else:
                buf += lit[i].encode("latin-1")
                i += 1
        out.append(bytes(buf))
    return out


def _child_export():
    import zlib

    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax_triton  # noqa: F401
    except Exception as e:
        print(
            json.dumps(
                {
                    "case": "export",
                    "skip": True,
                    "msg": f"jax_triton not importable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]}); install jax-triton and "
                    "`pip install --no-deps jax-cuda12-plugin==<jaxlib version>`",
                }
            ),
            flush=True,
        )
        return
    import jax
    import jax.numpy as jnp
    from jax import export

    from mmv_jax.kernels.triton_gpu import segment_attention_triton

    target = getattr(
        getattr(jax_triton, "triton_lib", None), "CUSTOM_CALL_TARGET_NAME", "triton_kernel_call"
    )
    for name, dt, d in (
        ("export_bf16_d64", jnp.bfloat16, 64),
        ("export_fp16_d128", jnp.float16, 128),
    ):
        try:

            def loss(q, k, v, seg):
                o = segment_attention_triton(q, k, v, seg, compute_capability=90)
                return jnp.sum(o.astype(jnp.float32))

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            x = jax.ShapeDtypeStruct((2, 1024, 6, d), dt)
            exp = export.export(
                fn,
                platforms=["cuda"],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
            )(x, x, x, jax.ShapeDtypeStruct((2, 1024), jnp.int32))
            text = exp.mlir_module()
            n_calls = text.count(f"@{target}(")
            if n_calls != 3:
                raise AssertionError(
                    f"expected 3 {target} custom calls (fwd, dq, dkv), got {n_calls}"
                )
            ptx = []
            for raw in _decode_mlir_strings(text):
                try:
                    ptx.append(zlib.decompress(raw))
                except zlib.error:
                    continue
            n_sm90 = sum(b".target sm_90" in p for p in ptx)
            if n_sm90 == 3:
                msg = f"{n_calls} kernels, PTX sm_90"
            elif jax_triton.__version__.startswith("0.3"):
                raise AssertionError(
                    f"expected 3 kernels compiled to PTX for sm_90, found {n_sm90}"
                )
            else:  # later jax-triton may embed a cubin instead of PTX text
                msg = f"{n_calls} kernels (jax-triton {jax_triton.__version__}: no PTX text to inspect)"
            print(json.dumps({"case": name, "ok": True, "msg": msg}), flush=True)
        except Exception as e:
            print(
                json.dumps({"case": name, "ok": False, "msg": f"{type(e).__name__}: {e}"}),
                flush=True,
            )


# ----------------------------------------------------------------------------- pytest side


def _run_child(mode, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
    if mode == "interp":
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["case"]] = rec
    if r.returncode != 0 or not results:
        pytest.fail(
            f"{mode} child failed (rc={r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
        )
    return results


_needs_interp = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="needs triton and torch (CPU) for Triton's interpreter; the test extra has both",
)


@pytest.fixture(scope="module")
def interp_results():
    return _run_child("interp")


@_needs_interp
@pytest.mark.parametrize(
    "case",
    ["fp32_d64", "fp16_d64", "fp16_d128", "fp32_poisoned_padding_block", "fp32_segment_over_bound"],
)
def test_interpreter_matches_reference(interp_results, case):
    rec = interp_results.get(case)
    assert rec is not None, interp_results
    assert rec["ok"], rec["msg"]


@pytest.mark.skipif(
    importlib.util.find_spec("jax_triton") is None or importlib.util.find_spec("triton") is None,
    reason="needs triton and jax-triton (+ jax-cuda12-plugin --no-deps)",
)
def test_export_for_cuda_compiles_ptx():
    results = _run_child("export")
    if "export" in results and results["export"].get("skip"):
        pytest.skip(results["export"]["msg"])
    for case in ("export_bf16_d64", "export_fp16_d128"):
        assert case in results, results
        assert results[case]["ok"], results[case]["msg"]


def test_unsupported_requests_raise():
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("triton")
    from mmv_jax.kernels.triton_gpu import check_supported

    seg = jnp.ones((1, 256), jnp.int32)
    with pytest.raises(ValueError, match="head dim D=96"):
        x = jnp.zeros((1, 256, 2, 96), jnp.bfloat16)
        check_supported(x, x, x, seg)
    with pytest.raises(ValueError, match="multiple of 128"):
        x = jnp.zeros((1, 200, 2, 64), jnp.bfloat16)
        check_supported(x, x, x, jnp.ones((1, 200), jnp.int32))
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        x = jnp.zeros((1, 256, 2, 64), jnp.int8)
        check_supported(x, x, x, seg)


def _device_check():
    import importlib.util as iu

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "device_check.py"
    )
    spec = iu.spec_from_file_location("device_check", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_check_dry_run_on_cpu(capsys):
    """The CPU-runnable parts: environment report, the correctness check and the timing table,
    with the XLA path in the kernel slot."""
    pytest.importorskip("jax")
    dc = _device_check()
    rc = dc.main(["--dry-run", "--seq-lens", "512", "--segments", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ALL CHECKS PASSED" in out
    import re

    for impl in ("kernel", "xla", "dense"):
        assert re.search(rf"\s{impl}\s+fwd\s+[0-9.]+\s", out), out
    assert out.count("PASS ") >= 2  # bf16 and fp32 checks
    assert "packed mix" in out and "fwd+bwd" in out
    assert re.search(r"Ti/14\s+1024\s+[0-9.]+\s+[0-9]+", out), out  # the train section's row


@pytest.mark.slow
def test_device_check_e2e_dry_run_on_cpu(capsys):
    """The launcher section on CPU (about a minute): demo data, two launch.train runs, resume."""
    pytest.importorskip("jax")
    dc = _device_check()
    rc = dc.main(["--dry-run", "--section", "e2e"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "resume: from" in out and "at step 2" in out
    assert "PASS  finite losses, one row per step, resumed at step 2" in out


if __name__ == "__main__":
    {"interp": _child_interp, "export": _child_export}[sys.argv[1]]()
