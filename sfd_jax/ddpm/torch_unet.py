r"""The class-conditional DDPM UNet of the original code in PyTorch (NCHW, the original ``state_dict`` names).

The same architecture as :class:`sfd_jax.models.ddpm_unet.ConditionalUNet`: ``python -m sfd_jax.bench
--compare=torch`` times it (:mod:`sfd_jax.ddpm.torch_bench`) and the parity tests compare against it (through
``tests/torch_reference.py``). Deliberate difference from the original: each ResnetBlock's class-embedding width is
4*ch (the original hard-codes 512, so only ch=128 runs); at ch=128 the two agree exactly.

Only torch is needed; nothing here imports JAX.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class EmbedMLP(nn.Module):
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
    """Class-conditional DDPM UNet of the original release; predicts eps with the shape of x.

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
        self.temb = EmbedMLP(ch, self.temb_ch)  # temb.dense.{0,1}
        self.classes_emb = nn.Embedding(n_classes, ch)  # [n_classes, ch], N(0, 1)
        self.cemb = EmbedMLP(ch, self.cemb_ch)  # cemb.dense.{0,1}

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


def model_kwargs(config) -> dict:
    """RefConditionalModel kwargs from one of our DDPM recipe configs."""
    m, d = config.model, config.data
    return dict(ch=m.ch, out_ch=m.out_ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, in_channels=m.in_channels,
                resolution=d.image_size, n_classes=d.n_classes, resamp_with_conv=m.resamp_with_conv)
