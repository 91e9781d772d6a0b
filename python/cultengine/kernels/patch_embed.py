"""ViT patch embedding in one kernel: patchify + projection GEMM (+ bias) (+ class token) + position embeddings.

Output row r of image n is token t = r % tokens_per_image. With a class token (CLIP), t = 0 is the class
token (its GEMM row is all zeros and the class embedding is added instead) and t >= 1 is patch t - 1 in
row-major order; without one (SigLIP), t is patch t. A projection bias (SigLIP, InternViT) is added to
the patch rows only. The GEMM
reads the pixels straight from the image (no im2col copy): column k of the patch matrix is pixel
(c, i, j) = (k // P², (k // P) % P, k % P) of the patch, the order of the conv weight reshaped [E, C*P*P].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _patch_embed_kernel(
    pix_ptr,
    w_ptr,
    bias_ptr,
    cls_ptr,
    pos_ptr,
    out_ptr,
    num_rows,
    embed_dim,
    k_dim,
    grid_w,
    tokens_per_image,
    stride_pn,
    stride_pc,
    stride_ph,
    stride_pw,
    stride_we,
    stride_pos,
    stride_cls,
    PATCH: tl.constexpr,
    HAS_CLS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < num_rows
    mask_c = cols < embed_dim

    image = rows // tokens_per_image
    token = rows % tokens_per_image
    patch = tl.maximum(token - HAS_CLS, 0)
    row_off = (
        image.to(tl.int64) * stride_pn + (patch // grid_w) * PATCH * stride_ph + (patch % grid_w) * PATCH * stride_pw
    )
    is_patch = mask_r & (token >= HAS_CLS)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < k_dim
        col_off = (ks // (PATCH * PATCH)) * stride_pc + ((ks // PATCH) % PATCH) * stride_ph + (ks % PATCH) * stride_pw
        a = tl.load(pix_ptr + row_off[:, None] + col_off[None, :], mask=is_patch[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_we + ks[:, None], mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        # Pixels are cast to the weight dtype first, as the reference conv does.
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)

    mask = mask_r[:, None] & mask_c[None, :]
    pos = tl.load(pos_ptr + token[:, None] * stride_pos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += pos
    if HAS_BIAS:  # the projection's bias: patch rows only (InternViT has a class token and a bias)
        bias = tl.load(bias_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    if HAS_CLS:
        cls = tl.load(cls_ptr + cols * stride_cls, mask=mask_c, other=0.0).to(tl.float32)
        acc += tl.where(token[:, None] == 0, cls[None, :], 0.0)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * embed_dim + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


def patch_embed(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    class_embedding: torch.Tensor | None,
    position_embedding: torch.Tensor,
) -> torch.Tensor:
    """`ops.patch_embed`: `[N, C, H, W]` pixels to `[N, (1 +) (H//P)*(W//P), E]` in the weight's dtype."""
    n, c, h, w = pixels.shape
    e, _, p, _ = weight.shape
    grid_h, grid_w = h // p, w // p  # like the strided conv, a ragged edge is dropped
    has_cls = class_embedding is not None
    tokens = has_cls + grid_h * grid_w
    assert position_embedding.shape == (tokens, e), "position embeddings must match the patch grid"
    w2 = weight.reshape(e, c * p * p)
    if w2.stride(-1) != 1:
        w2 = w2.contiguous()
    pos = position_embedding if position_embedding.stride(-1) == 1 else position_embedding.contiguous()
    out = torch.empty((n, tokens, e), dtype=weight.dtype, device=weight.device)
    # 128 x 128 tiles spill registers on sm_90 (the pixel gather holds a pointer per element); 64 x 128 don't.
    block_m, block_n, block_k = 64, 128, 32
    grid = (triton.cdiv(n * tokens, block_m), triton.cdiv(e, block_n))
    _patch_embed_kernel[grid](
        pixels,
        w2,
        bias if bias is not None else w2,
        class_embedding if has_cls else w2,
        pos,
        out,
        n * tokens,
        e,
        c * p * p,
        grid_w,
        tokens,
        pixels.stride(0),
        pixels.stride(1),
        pixels.stride(2),
        pixels.stride(3),
        w2.stride(0),
        pos.stride(0),
        class_embedding.stride(0) if has_cls else 0,
        PATCH=p,
        HAS_CLS=has_cls,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=3,
    )
    return out
