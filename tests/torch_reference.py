"""Independent PyTorch reference of the SFD DDPM pieces, for JAX/Flax parity tests.

Written from the project's facts sheet (/work/shared/spec/seed_facts.md, sections 1.1, 1.2, 1.5,
1.7 and the Part 4b corrections), not from the original code.  It needs only torch and numpy.

Contents
- ``RefConditionalModel``: the class-conditional UNet of section 1.1 (NCHW), with the original
  ``state_dict`` names, so that its weights can be fed to the checkpoint converter and its outputs
  compared with the Flax model.
- ``ref_get_beta_schedule`` / ``ref_alphas_cumprod``: the schedules of section 1.2.
- ``ref_seq``, ``ref_one_step``, ``ref_ddim``, ``ref_ddpm``: the samplers of sections 1.5 and 1.7.
- ``count_params`` and the model kwargs ``CIFAR10_KW`` / ``STL10_KW`` of section 1.6.

Deliberate difference from the original: each ResnetBlock's class-embedding width is 4*ch (the
original hard-codes 512, so only ch=128 runs).  For ch=128 the two agree exactly.

Shape notation: B batch, C channels, H = W = spatial side, D = 4*ch embedding width.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CIFAR10_KW",
    "STL10_KW",
    "RefConditionalModel",
    "count_params",
    "ref_alphas_cumprod",
    "ref_compute_alpha",
    "ref_ddim",
    "ref_ddpm",
    "ref_get_beta_schedule",
    "ref_one_step",
    "ref_seq",
    "ref_timestep_embedding",
]

# Model kwargs of the shipped configs (section 1.6).  cond_drop_prob is left at its default 0.0
# (the sid/sfd configs); cifar10_train.yml uses 0.1.
CIFAR10_KW = dict(
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    in_channels=3,
    resolution=32,
    n_classes=10,
    resamp_with_conv=True,
)
STL10_KW = dict(CIFAR10_KW, ch_mult=(1, 2, 2, 2, 4), resolution=64)


# ---------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps=1e-6, affine)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, tensor2tensor style.  t: [B] (float, may be non-integer) -> [B, dim].

    half = dim // 2; freq_k = exp(-k * ln(10000) / (half - 1)); emb = [sin(t*freq), cos(t*freq)]
    (sin first); an odd dim is zero-padded by one column.
    """
    assert t.ndim == 1, "timesteps must be a 1-D tensor"
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)  # [half]
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2*half]
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class _EmbedMLP(nn.Module):
    """Linear(in -> D), swish, Linear(D -> D); no final activation.  Names: dense.0, dense.1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, D]
        return self.dense[1](swish(self.dense[0](x)))


class ResnetBlock(nn.Module):
    """x: [B, Cin, H, W], temb/cemb: [B, D] -> [B, Cout, H, W].

    h = conv1(swish(GN1(x))) + temb_cemb_proj(swish(concat(temb, cemb)))[..., None, None]
    h = conv2(dropout(swish(GN2(h))));  return shortcut(x) + h  (1x1 nin_shortcut iff Cin != Cout).
    Parameter order: norm1, conv1, temb_cemb_proj, norm2, conv2, [nin_shortcut].
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, temb_channels: int,
                 cemb_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # Columns [0, temb_channels) act on temb, the rest on cemb (temb comes first).
        self.temb_cemb_proj = nn.Linear(temb_channels + cemb_channels, out_channels)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # [B, Cout, H, W]
        emb = self.temb_cemb_proj(swish(torch.cat([temb, cemb], dim=-1)))  # [B, Cout]
        h = h + emb[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))  # [B, Cout, H, W]
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions.  x: [B, C, H, W] -> [B, C, H, W].

    Parameter order: norm, q, k, v, proj_out (1x1 convs with bias).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hgt * wid).permute(0, 2, 1)  # [B, N, C] (queries i)
        k = self.k(h).reshape(b, c, hgt * wid)  # [B, C, N] (keys j)
        v = self.v(h).reshape(b, c, hgt * wid)  # [B, C, N]
        w = torch.bmm(q, k) * (c ** -0.5)  # [B, N_i, N_j]
        w = torch.softmax(w, dim=2)  # softmax over key positions j
        out = torch.bmm(v, w.permute(0, 2, 1))  # [B, C, N_i]: out_i = sum_j w_ij v_j
        out = out.reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2].

    with_conv: zero-pad right/bottom by 1, then 3x3 conv stride 2 pad 0 (name: conv);
    otherwise 2x2 average pooling (no parameters).
    """

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (left, right, top, bottom)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W]: nearest x2, then (with_conv) 3x3 conv pad 1 (name: conv)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------


class RefConditionalModel(nn.Module):
    """Class-conditional DDPM UNet of section 1.1; predicts eps with the shape of x.

    forward(x [B, in_channels, R, R], t [B] float, c [B] long, mode) -> [B, out_ch, R, R].
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, in_channels: int, resolution: int,
                 n_classes: int, resamp_with_conv: bool = True, cond_drop_prob: float = 0.0):
        super().__init__()
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        self.ch = ch
        self.temb_ch = 4 * ch
        self.cemb_ch = 4 * ch  # the original hard-codes 512 inside ResnetBlock (see module doc)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.cond_drop_prob = cond_drop_prob

        def block(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, dropout, self.temb_ch, self.cemb_ch)

        # --- embeddings (registration order fixes the state_dict order) ---
        self.null_classes_emb = nn.Parameter(torch.randn(ch))  # [ch], N(0, 1)
        self.temb = _EmbedMLP(ch, self.temb_ch)  # temb.dense.{0,1}
        self.classes_emb = nn.Embedding(n_classes, ch)  # [n_classes, ch], N(0, 1)
        self.cemb = _EmbedMLP(ch, self.cemb_ch)  # cemb.dense.{0,1}

        # --- downsampling ---
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i]
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(block(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        # --- middle ---
        self.mid = nn.Module()
        self.mid.block_1 = block(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = block(block_in, block_in)

        # --- upsampling: built from the lowest resolution up, stored by level index ---
        up_levels = []
        for i in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i]
            skip_in = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                if j == num_res_blocks:
                    skip_in = ch * in_ch_mult[i]
                level.block.append(block(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            up_levels.insert(0, level)  # up[i] is resolution level i; up[L-1] runs first
        self.up = nn.ModuleList(up_levels)

        # --- end ---
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    # ----- conditioning -----

    def _keep_mask(self, batch: int, device: torch.device, cond_drop_prob: Optional[float],
                   cond_drop_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample bool keep mask [B] (True = use the class embedding)."""
        if cond_drop_prob is None:
            cond_drop_prob = self.cond_drop_prob
        if cond_drop_mask is not None:
            return ~cond_drop_mask.to(device=device, dtype=torch.bool)
        if cond_drop_prob > 0:
            return torch.rand(batch, device=device) < (1.0 - cond_drop_prob)
        return torch.ones(batch, dtype=torch.bool, device=device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                 cond_drop_prob: Optional[float] = None,
                 cond_drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One network pass.  x: [B, Cin, R, R], t: [B], c: [B] -> [B, out_ch, R, R]."""
        b = x.shape[0]
        assert x.shape[2] == x.shape[3] == self.resolution, (x.shape, self.resolution)
        if not torch.is_tensor(t):
            t = torch.full((b,), float(t), device=x.device)
        param_dtype = self.temb.dense[0].weight.dtype

        # timestep embedding: [B] -> [B, ch] -> [B, D]
        temb = self.temb(ref_timestep_embedding(t, self.ch).to(param_dtype))

        # class embedding, null vector mixed in BEFORE the MLP: [B] -> [B, ch] -> [B, D]
        keep = self._keep_mask(b, x.device, cond_drop_prob, cond_drop_mask)
        keep = keep.to(param_dtype)[:, None]  # [B, 1] in {0, 1}
        cemb_in = keep * self.classes_emb(c) + (1.0 - keep) * self.null_classes_emb[None, :]
        cemb = self.cemb(cemb_in)

        # down path; hs is the skip stack
        hs = [self.conv_in(x)]  # [B, ch, R, R]
        for i in range(self.num_resolutions):
            level = self.down[i]
            for j in range(self.num_res_blocks):
                h = level.block[j](hs[-1], temb, cemb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        # middle at the lowest resolution
        h = hs[-1]
        h = self.mid.block_1(h, temb, cemb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb, cemb)

        # up path: levels L-1 .. 0; each block eats concat([h, skip]) on channels (h first)
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = level.block[j](torch.cat([h, hs.pop()], dim=1), temb, cemb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        assert not hs

        h = self.conv_out(swish(self.norm_out(h)))  # [B, out_ch, R, R]
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, mode: str,
                cond_drop_prob: Optional[float] = None, cond_drop_mask: Optional[torch.Tensor] = None,
                cond_scale: Optional[float] = None) -> torch.Tensor:
        """'train': one pass (cond_drop_prob None -> the constructor default; cond_scale ignored).

        'test': cond_scale is required; cond_drop_prob None -> 0.0.  With s = cond_scale:
        s == 0 -> one pass; else (1 + s) * out - s * null, null being a pass with cond_drop_prob=1.0.
        cond_drop_mask: bool [B], True = DROP the label (overrides cond_drop_prob for `out`).
        """
        if mode == "train":
            return self._forward(x, t, c, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask)
        if mode == "test":
            if cond_scale is None:
                raise ValueError("mode 'test' needs cond_scale (the original crashes on None)")
            if cond_drop_prob is None:
                cond_drop_prob = 0.0
            out = self._forward(x, t, c, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask)
            if cond_scale == 0:
                return out
            null = self._forward(x, t, c, cond_drop_prob=1.0)
            return (1.0 + cond_scale) * out - cond_scale * null
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")


def count_params(model: nn.Module) -> int:
    """Total number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Schedules (section 1.2)
# ---------------------------------------------------------------------------------------------


def ref_get_beta_schedule(kind: str, beta_start: float, beta_end: float, T: int) -> np.ndarray:
    """float64 numpy betas [T]."""
    if kind == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif kind == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif kind == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
        betas = s * (beta_end - beta_start) + beta_start
    else:
        raise NotImplementedError(kind)
    assert betas.shape == (T,)
    return betas


def ref_alphas_cumprod(betas) -> torch.Tensor:
    """abar [T] = cumprod(1 - beta), with beta cast to float32 first and the product in float32."""
    b = torch.as_tensor(np.asarray(betas) if not torch.is_tensor(betas) else betas).float()
    return (1.0 - b).cumprod(dim=0)


def ref_compute_alpha(betas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar_t for t in {-1, ..., T-1} as [B, 1, 1, 1]; abar_{-1} = 1 (a zero beta is prepended)."""
    b = torch.cat([torch.zeros(1, dtype=betas.dtype, device=betas.device), betas], dim=0)
    a = (1.0 - b).cumprod(dim=0).index_select(0, t.long() + 1)
    return a.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Samplers (sections 1.5 and 1.7)
# ---------------------------------------------------------------------------------------------

# A sampler's model is any callable model(x, t, c, mode, cond_drop_prob=..., cond_scale=...).
ModelFn = Callable[..., torch.Tensor]


def ref_seq(skip_type: str, timesteps: int, T: int) -> list[int]:
    """The timestep sequence (ascending) for the generalized sampler."""
    if skip_type == "uniform":
        skip = T // timesteps
        return list(range(0, T, skip))
    if skip_type == "quad":
        return [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), timesteps) ** 2)]
    raise NotImplementedError(skip_type)


def ref_one_step(model: ModelFn, z: torch.Tensor, c: torch.Tensor, t_init: int,
                 alphas_cumprod: torch.Tensor, cond_scale: float) -> torch.Tensor:
    """One-step generator: x_t = init_b*z; x0 = x_t/init_a - init_sigma*eps.  z: [B, C, H, W]."""
    abar = alphas_cumprod[t_init]
    init_a = abar.sqrt()
    init_b = (1.0 - abar).sqrt()
    init_sigma = (1.0 / abar - 1.0).sqrt()
    x_t = init_b * z
    t = torch.full((z.shape[0],), float(t_init), device=z.device)
    eps = model(x_t, t, c, "test", cond_drop_prob=0.0, cond_scale=cond_scale)
    return x_t / init_a - init_sigma * eps


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def ref_ddim(model: ModelFn, x: torch.Tensor, c: torch.Tensor, seq: Sequence[int],
             betas: torch.Tensor, eta: float, cond_scale: float,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generalized (DDIM-with-eta) steps; x: [B, C, H, W] starting noise -> final sample.

    One N(0, I) draw (shape of x) per step, in order from the largest timestep down.
    """
    n = x.shape[0]
    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(list(seq)), reversed(seq_next)):
        t = torch.ones(n, device=x.device) * i
        t_next = torch.ones(n, device=x.device) * j
        at = ref_compute_alpha(betas, t)
        at_next = ref_compute_alpha(betas, t_next)
        eps = model(x, t, c, "test", cond_scale=cond_scale)
        x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()  # no clipping
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1 ** 2).sqrt()
        x = at_next.sqrt() * x0 + c1 * _randn_like(x, generator) + c2 * eps
    return x


@torch.no_grad()
def ref_ddpm(model: ModelFn, x: torch.Tensor, c: torch.Tensor, seq: Sequence[int],
             betas: torch.Tensor, cond_scale: float,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Intended ancestral ('ddpm_noisy') steps; x: [B, C, H, W] starting noise -> final sample.

    One N(0, I) draw per step (also at t == 0, where it is masked out), so the random stream
    matches a loop that always draws.
    """
    n = x.shape[0]
    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(list(seq)), reversed(seq_next)):
        t = torch.ones(n, device=x.device) * i
        t_next = torch.ones(n, device=x.device) * j
        at = ref_compute_alpha(betas, t)
        atm1 = ref_compute_alpha(betas, t_next)
        beta_t = 1 - at / atm1
        eps = model(x, t, c, "test", cond_scale=cond_scale)
        x0 = ((1.0 / at).sqrt() * x - (1.0 / at - 1).sqrt() * eps).clamp(-1, 1)
        mean = ((atm1.sqrt() * beta_t) * x0 + ((1 - beta_t).sqrt() * (1 - atm1)) * x) / (1.0 - at)
        noise = _randn_like(x, generator)
        mask = (1.0 - (t == 0).to(x.dtype)).view(-1, 1, 1, 1)
        x = mean + mask * torch.exp(0.5 * beta_t.log()) * noise
    return x
