"""Compile every kernel specialization for sm_80 and sm_90 without a GPU (Triton ships ptxas) and report
what the PTX holds. Run as a script with `TRITON_INTERPRET=0` (under the interpreter `triton.jit` gives
no compilable function); prints one JSON object: `{"kernel[spec]@sm": {"mma": bool, "wgmma": bool}}`.

    TRITON_INTERPRET=0 python tests/ops/compile_kernels.py [--representative] [label prefixes...]

`--representative` compiles one specialization per kernel in bfloat16 and, for the dot kernels, in exact
float32: the two ends of the tensor-core rule, in about a sixth of the time of the full set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from negtransfer_losses.ops import _kernel_channel_cosine as channel_cosine
from negtransfer_losses.ops import _kernel_distribution_matching as distribution_matching
from negtransfer_losses.ops import _kernel_gram_cosine as gram_cosine

ELEMENT = {tl.float32: "fp32", tl.float16: "fp16", tl.bfloat16: "bf16"}
# (name, dot dtype, precision): the dtypes the wrappers pass, fp32 in both of its modes
DOT_MODES = [("fp32-ieee", tl.float32, "ieee"), ("fp32-tf32", tl.float32, "tf32"), ("fp16", tl.float16, "ieee"),
             ("bf16", tl.bfloat16, "ieee")]  # fmt: skip


def specializations() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """`(label, kernel, argument types, constexprs)` for every specialization the wrappers launch."""
    for label, dot, precision in DOT_MODES:
        data = "*" + ELEMENT[dot]
        common = {"DOT_DTYPE": dot, "PRECISION": precision}
        for block in (gram_cosine.BLOCK_DIM, 16):  # N ≥ 64, and N ≤ 16 (32 compiles as 64 does)
            reduce_blocks = {**common, "BLOCK_R": gram_cosine.BLOCK_ROWS, "BLOCK_N": block}
            rows_blocks = {**reduce_blocks, "SPLIT": dot != tl.float32}
            for one in (True, False) if block == gram_cosine.BLOCK_DIM else (True,):
                tag = f"{label},block={block},one_tile={one}"
                yield (f"identity_reduce[{tag}]", gram_cosine._identity_reduce_kernel,
                       {"w_ptr": data, "u_ptr": data, "part_ptr": "*fp32", "exp_ptr": "*i32", "top_ptr": "*i32"},
                       {**reduce_blocks, "ONE_TILE": one})  # fmt: skip
                yield (f"identity_grad_reduce[{tag}]", gram_cosine._identity_grad_reduce_kernel,
                       {"w_ptr": data, "u_ptr": data, "grad_ptr": "*fp32", "cos_ptr": "*fp32", "norm_s_ptr": "*fp32",
                        "norm_t_ptr": "*fp32", "top_ptr": "*i32", "part_ptr": "*fp32", "exp_ptr": "*i32",
                        "coef_top_ptr": "*i32", "eps": "fp32"}, {**reduce_blocks, "ONE_TILE": one})  # fmt: skip
                yield (f"identity_rows[{tag}]", gram_cosine._identity_rows_kernel,
                       {"w_ptr": data, "u_ptr": data, "parts_ptr": data if dot != tl.float32 else "*fp32",
                        "factor_ptr": "*fp32", "top_ptr": "*i32", "cos_ptr": "*fp32", "norm_s_ptr": "*fp32",
                        "norm_t_ptr": "*fp32", "eps": "fp32"}, {**rows_blocks, "ONE_TILE": one})  # fmt: skip
            parts = data if dot != tl.float32 else "*fp32"
            yield (f"identity_grad_rows[{label},block={block}]", gram_cosine._identity_grad_rows_kernel,
                   {"w_ptr": data, "u_ptr": data, "fwd_parts_ptr": parts, "fwd_factor_ptr": "*fp32",
                    "parts_ptr": parts, "factor_ptr": "*fp32", "top_ptr": "*i32", "coef_top_ptr": "*i32",
                    "grad_ptr": "*fp32", "cos_ptr": "*fp32", "norm_s_ptr": "*fp32", "norm_t_ptr": "*fp32",
                    "dw_ptr": data, "eps": "fp32"}, {k: v for k, v in rows_blocks.items()})  # fmt: skip
            for forward in (True, False):
                yield (f"identity_finalize[{label},block={block},forward={forward}]", gram_cosine._finalize_kernel,
                       {"part_ptr": "*fp32", "exp_ptr": "*i32", "top_ptr": "*i32", "parts_ptr": parts,
                        "factor_ptr": "*fp32"},
                       {"MATS": 3 if forward else 2, "FORWARD": forward, "DOT_DTYPE": dot,
                        "SPLIT": dot != tl.float32, "BLOCK_N": block})  # fmt: skip
        tiles = {"BLOCK_I": gram_cosine.TILE_ROWS, "BLOCK_J": gram_cosine.TILE_COLUMNS,
                 "BLOCK_N": gram_cosine.TILE_POSITIONS}  # fmt: skip
        yield (f"tile_forward[{label}]", gram_cosine._tile_forward_kernel,
               {"w_ptr": data, "u_ptr": data, "scale_ptr": "*fp32", "cos_ptr": "*fp32", "norm_s_ptr": "*fp32",
                "norm_t_ptr": "*fp32", "eps": "fp32"}, {**common, **tiles})  # fmt: skip
        for one in (True, False):
            yield (f"tile_backward[{label},one_chunk={one}]", gram_cosine._tile_backward_kernel,
                   {"w_ptr": data, "u_ptr": data, "scale_ptr": "*fp32", "coef_ptr": "*fp32", "dw_ptr": data,
                    "acc_ptr": "*fp32"}, {**common, **tiles, "ONE_CHUNK": one, "SPLIT": dot != tl.float32})  # fmt: skip
    yield from channel_cosine.compile_specializations()
    yield from distribution_matching.compile_specializations()


def compile_ptx(kernel: Any, types: dict[str, str], constexprs: dict[str, Any], capability: int) -> str:
    """PTX of `kernel` for `sm_{capability}`; arguments not named in `types` or `constexprs` are int32."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    ptx: str = compiled.asm["ptx"]
    return ptx


def main() -> None:
    report: dict[str, dict[str, bool]] = {}
    representative = "--representative" in sys.argv
    only = [arg for arg in sys.argv[1:] if arg != "--representative"]
    kept: set[tuple[str, str]] = set()
    for label, kernel, types, constexprs in specializations():
        if only and not any(label.startswith(o) for o in only):
            continue
        if representative:
            name, mode = label.split("[", 1)[0], label.split("[", 1)[1].split(",", 1)[0].rstrip("]")
            if mode not in ("bf16", "fp32-ieee") or (name, mode) in kept:
                continue
            kept.add((name, mode))
        for capability in (80, 90):
            ptx = compile_ptx(kernel, types, constexprs, capability)
            report[f"{label}@sm_{capability}"] = {"mma": "mma.sync" in ptx, "wgmma": "wgmma" in ptx}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
