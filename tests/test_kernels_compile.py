"""Every Triton kernel of minidpo.kernels compiles for real GPUs (sm_80 and sm_90), on a machine
without one: the interpreter the other tests run the kernels under does not type-check, the
compiler does.

Each module of `kernels/` lists its launch configurations in GPU_COMPILE_CASES, tuples
`(jit_fn, signature, constexprs[, options])` for `triton.compiler.ASTSource` (signature values
are Triton type strings: "*fp32", "*bf16", "i32", "constexpr"...). One subprocess (without
TRITON_INTERPRET, with a fresh Triton cache) imports every module, fails any `@triton.jit`
function without a case, builds PTX and cubin for each case and target, and reports registers,
shared memory and local memory (spills) per kernel; the report is printed (`pytest -s`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)  # A100, H100/H200


@triton.jit
def _canary_kernel(a_ptr, out_ptr, K: tl.constexpr):
    """A kernel the interpreter runs but no GPU compiler builds (tl.dot needs K >= 8): the proof
    that this test can fail."""
    m = tl.arange(0, 16)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(a_ptr + k[:, None] * 16 + m[None, :])
    tl.store(out_ptr + m[:, None] * 16 + m[None, :], tl.dot(a, b))


CANARY_CASE = {"signature": {"a_ptr": "*fp32", "out_ptr": "*fp32", "K": "constexpr"}, "constexprs": {"K": 4}}

WORKER = r"""
import importlib, json, re, subprocess, sys, tempfile, time
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import JITFunction
sys.path.insert(0, sys.argv[1])
from minidpo.logprobs import _import_kernels

targets = json.loads(sys.argv[2])
cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(cubin):
    # REG / SHARED / LOCAL as cuobjdump reports them for the cubin (None without cuobjdump).
    if not cuobjdump.is_file():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}


def jitted(module):
    found = {}
    for name, obj in vars(module).items():
        while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # autotune / heuristics
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
            found[name] = obj
    return found


report = {"modules": {}, "triton": triton.__version__}
for file in sorted((Path(sys.argv[1]) / "kernels").glob("*.py")):
    if file.stem == "__init__":
        continue
    entry = report["modules"].setdefault(file.stem, {"errors": [], "compiled": []})
    try:
        module = _import_kernels(file.stem)
    except Exception as e:
        entry["errors"].append(f"import failed: {type(e).__name__}: {e}")
        continue
    cases = getattr(module, "GPU_COMPILE_CASES", None)
    if not cases:
        entry["errors"].append("no GPU_COMPILE_CASES")
        continue
    covered = {getattr(case[0], "__name__", None) for case in cases}
    for name in sorted(set(jitted(module)) - covered):
        entry["errors"].append(f"@triton.jit {name} has no case in GPU_COMPILE_CASES")
    for case in cases:
        fn, signature, constexprs = case[:3]
        options = case[3] if len(case) > 3 else {}
        what = f"{fn.__name__}({', '.join(f'{k}={v}' for k, v in signature.items() if v != 'constexpr')})"
        for cap in targets:
            start = time.perf_counter()
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32),
                                        options=options)
                if not kernel.asm.get("cubin") or not kernel.asm.get("ptx"):
                    raise RuntimeError("no PTX or cubin was produced")
            except Exception as e:
                entry["errors"].append(f"{what} for sm_{cap}: {type(e).__name__}: {str(e)[:400]}")
                continue
            entry["compiled"].append({"kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
                                      "options": options, "sm": cap, "seconds": time.perf_counter() - start,
                                      "shared_meta": kernel.metadata.shared, **resources(kernel.asm["cubin"])})
sys.path.insert(0, str(Path(sys.argv[1]) / "tests"))
from test_kernels_compile import CANARY_CASE, _canary_kernel
try:
    triton.compile(ASTSource(_canary_kernel, CANARY_CASE["signature"], CANARY_CASE["constexprs"]),
                   target=GPUTarget("cuda", 80, 32))
    report["canary"] = None
except Exception as e:
    report["canary"] = f"{type(e).__name__}: {str(e)[-200:]}"
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compile, do not reuse
    proc = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), json.dumps(TARGETS)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"compile worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("REPORT "):])


def _table(report):
    rows = [f"triton {report['triton']}", "| module | kernel | types | sm | registers | shared B | local B | s |",
            "|---|---|---|---|---|---|---|---|"]
    for module, entry in report["modules"].items():
        for c in entry["compiled"]:
            types = ",".join(v.lstrip("*") for k, v in c["signature"].items() if v.startswith("*"))
            rows.append(f"| {module} | {c['kernel']} | {types} | {c['sm']} | {c.get('reg', '?')} | "
                        f"{c.get('shared', c['shared_meta'])} | {c.get('local', '?')} | {c['seconds']:.1f} |")
    return "\n".join(rows)


def test_every_kernel_module_compiles_for_sm80_and_sm90(report):
    print("\n" + _table(report))
    assert report["modules"], "no module found in kernels/"
    errors = [f"{m}: {e}" for m, entry in report["modules"].items() for e in entry["errors"]]
    assert not errors, "\n".join(errors) + "\n" + _table(report)
    for module, entry in report["modules"].items():
        built = {(c["kernel"], c["sm"]) for c in entry["compiled"]}
        assert {sm for _, sm in built} == set(TARGETS), module


def test_logprobs_kernels_cover_their_launch_dtypes(report):
    """The log-prob kernels are launched with fp32 (the fused head's chunks), bf16 and fp16
    logits: each must have compiled for both targets in each."""
    compiled = report["modules"]["logprobs"]["compiled"]
    for kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
        for dtype in ("*fp32", "*bf16", "*fp16"):
            sms = {c["sm"] for c in compiled if c["kernel"] == kernel and c["signature"]["x_ptr"] == dtype}
            assert sms == set(TARGETS), (kernel, dtype, sms)


def test_the_compile_check_catches_what_the_interpreter_lets_through(report, tmp_path):
    """The canary kernel runs under TRITON_INTERPRET=1 and fails to compile for sm_80."""
    assert report["canary"] and "K >= " in report["canary"], report["canary"]
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from test_kernels_compile import _canary_kernel\n"
              "a = torch.randn(64); out = torch.zeros(256); _canary_kernel[(1,)](a, out, 4)\n"
              "m = torch.arange(16); ref = a[m[:, None] * 4 + torch.arange(4)] @ a[torch.arange(4)[:, None] * 16 + m]\n"
              "assert torch.allclose(out.view(16, 16), ref, atol=1e-4), 'wrong result'\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT / "tests")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
