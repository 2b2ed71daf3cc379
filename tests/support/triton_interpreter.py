"""FLA's Triton kernels on CPU through Triton's interpreter: a test-only shim.

tests/unit/test_triton_kernel.py and tests/unit/test_gpu_check.py run FLA 0.6.0's real
``chunk_gated_delta_rule`` under ``TRITON_INTERPRET=1`` in a subprocess
(tiny shapes): :func:`install_interpreter_shim` patches two Triton internals
for that; :func:`fla_gated_delta_rule_anywhere` is titan_cp's Triton kernel without the
CUDA check (its CP segment kernel: ``VarlenSegmentKernel(require_cuda=False)``). Never
needed on a GPU.
"""

from __future__ import annotations

import ast
import os

from titan_cp.ops.gated_delta_rule.triton import fla_varlen, gated_delta_rule_via_varlen


VERIFIED = {"triton": "3.9.", "fla-core": "0.6.0"}  # the shim patches Triton internals: other versions skip


def version_skip_reason(verified: dict[str, str] = VERIFIED, what: str = "the interpreter shim") -> str | None:
    """Why a test that needs these package versions (name -> version prefix) must skip, or None."""
    from importlib import metadata

    for package, prefix in verified.items():
        try:
            found = metadata.version(package)
        except metadata.PackageNotFoundError:
            return f"{package} is not installed"
        if not found.startswith(prefix):
            return f"{what} is verified with {package} {prefix}*, found {found}"
    return None


def install_interpreter_shim() -> None:
    """Make FLA 0.6.0's chunk_gated_delta_rule run under ``TRITON_INTERPRET=1`` on CPU (tiny shapes).

    For tests (tests/unit/test_triton_kernel.py runs it in a subprocess); never
    needed on a GPU. Call it before anything imports FLA, in a process whose
    environment has ``TRITON_INTERPRET=1`` (set here if it is not): Triton
    picks the interpreter when FLA's kernels are decorated at import. Two
    patches, both to Triton (verified with triton 3.9.0 + fla-core 0.6.0):

    1. ``Autotuner.run`` keeps only the first config of an autotuned kernel:
       without a driver the autotuner cannot benchmark ("0 active drivers"),
       and every config computes the same result.
    2. The interpreter's AST rewriter makes the induction variable of a
       dynamic ``range`` / ``tl.range`` loop a Triton tensor, as compiled
       Triton does. Without it FLA's chunk_delta_h.py fails at
       ``i_t_int64 = i_t.to(tl.int64)`` (chunk_gated_delta_rule_fwd_kernel_h_blockdim64,
       fla/ops/common/chunk_delta_h.py:176): "InterpreterError:
       AttributeError(\"'int' object has no attribute 'to'\")".
       ``tl.static_range`` loops keep Python ints.
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton.runtime import interpreter  # after TRITON_INTERPRET is set
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner, "_titan_cp_shim", False):
        return
    original_run = Autotuner.run

    def run_first_config(self, *args, **kwargs):
        if len(self.configs) > 1:
            self.configs = self.configs[:1]
        return original_run(self, *args, **kwargs)

    def visit_For(self, node):
        node = self.generic_visit(node)
        it = node.iter
        dynamic = isinstance(it, ast.Call) and (
            (isinstance(it.func, ast.Name) and it.func.id == "range")
            or (isinstance(it.func, ast.Attribute) and it.func.attr == "range")
        )
        if dynamic and isinstance(node.target, ast.Name):
            # "i = i" as the loop body's first statement: visit_Assign turns it into a tensor.
            rebind = ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                                value=ast.Name(id=node.target.id, ctx=ast.Load()))
            node.body.insert(0, self.visit_Assign(rebind))
        return node

    Autotuner.run = run_first_config
    interpreter.ASTTransformer.visit_For = visit_For
    Autotuner._titan_cp_shim = True


def fla_gated_delta_rule_anywhere(q, k, v, g, beta, **kwargs):
    """titan_cp.ops.gated_delta_rule.triton.triton_gated_delta_rule without the CUDA check (interpreter on CPU)."""
    if kwargs.get("initial_state") is not None:
        kwargs["initial_state"] = kwargs["initial_state"].float()
    return gated_delta_rule_via_varlen(fla_varlen, q, k, v, g, beta, **kwargs)
