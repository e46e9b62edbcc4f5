"""An ``mmv-export`` folder as a PyTorch encoder that takes plain images.

    from mmv_jax.torch import load_encoder
    enc = load_encoder("exports/stage3")                       # CPU; .to("cuda") as usual
    z = enc.embed([xray, ct_hu], spacing=[None, (1.5, 0.7, 0.7)])   # [2, D] torch.float32

``xray``: ``[H, W]`` tensor/array (any intensity scale), ``ct_hu``: ``[Z, H, W]`` in HU (axis 0
inferior -> superior) with its spacing in mm; file paths work too. The preprocessing, the
whole-image view and the packing are the JAX side's own (numpy, :mod:`mmv_jax.images`), so a
CXR and a CT embed as ``mmv_jax.load_encoder(folder).embed`` does (fp32, within 1e-4).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mmv_jax import export as ex, images as im
from mmv_jax.data import packing
from mmv_jax.torch.model import MultiMedVisionTorch


class TorchEncoder(MultiMedVisionTorch):
    """The encoder of :class:`MultiMedVisionTorch` (no projector) plus the export's
    preprocessing; ``state_dict`` names are the export's (timm-style)."""

    def __init__(self, conf: dict, attn_impl: str = "varlen"):
        m = conf["model"]
        # the smallest projector, dropped at once: the export carries the encoder only
        super().__init__(
            width=int(m["width"]),
            depth=int(m["depth"]),
            heads=int(m["heads"]),
            mlp_ratio=int(m["mlp_ratio"]),
            patch=int(m["patch_size"]),
            rope_base=float(m["rope"]["base"]),
            proj_hidden=1,
            proj_dim=1,
            proj_layers=1,
            proj_norm="layer",
            eps=float(m["ln_eps"]),
            attn_impl=attn_impl,
        )
        del self.projector
        p = conf["preprocessing"]
        self.conf = conf
        self.preprocessing = im.Preprocessing(
            int(p["long_side_2d"]),
            int(p["long_side_3d"]),
            (float(p["ct_window"]["width"]), float(p["ct_window"]["level"])),
            p.get("max_image_voxels") or None,
        )

    @property
    def dim(self) -> int:
        return self.width

    def forward(self, batch, impl: str | None = None):
        """A packed batch -> per-view embeddings ``[R, V, D]``."""
        return self.encode(batch, impl)

    def _packed(self, prepared):
        views = im.views_of(prepared)
        seq_len = max(v.num_tokens for v in views)  # any row length is exact here (varlen)
        batch, _ = packing.pack_compact(
            views,
            seq_len,
            len(views),
            packing.patch_dim_for(any(p.modality == "ct" for p in prepared)),
        )
        dev = next(self.parameters()).device
        return batch, type(batch)(
            *(torch.from_numpy(np.ascontiguousarray(x)).to(dev) for x in batch)
        )

    @torch.no_grad()
    def embed(self, images, *, spacing=None, modality=None, batch_size: int = 16) -> torch.Tensor:
        """One or a list of ``[H, W]`` X-rays / ``[Z, H, W]`` CT (HU) tensors, arrays or paths
        (``spacing``/``modality`` as for ``mmv_jax.Encoder.embed``) -> ``[N, D]`` float32."""
        prepared = im.prepare_all(images, self.preprocessing, spacing=spacing, modality=modality)
        out = [np.zeros((0, self.width), np.float32)]
        for start in range(0, len(prepared), int(batch_size)):
            chunk = prepared[start : start + int(batch_size)]
            batch, tb = self._packed(chunk)
            pooled = self.encode(tb).float().cpu().numpy()
            out.append(im.gather(batch, pooled, len(chunk)))
        return torch.from_numpy(np.concatenate(out))

    @torch.no_grad()
    def patch_features(self, image, *, spacing=None, modality=None) -> torch.Tensor:
        """``[gy, gx, D]`` (X-ray) or ``[gz, gy, gx, D]`` (CT) final-norm patch tokens."""
        [p] = im.prepare_all(image, self.preprocessing, spacing=spacing, modality=modality)
        batch, tb = self._packed([p])
        tokens = self.tokens(tb.patches, tb.segment_ids, tb.coords).float().cpu().numpy()
        return torch.from_numpy(im.token_grid(batch, tokens, 0))


def load_encoder(folder, attn_impl: str = "varlen") -> TorchEncoder:
    """An ``mmv-export`` folder -> :class:`TorchEncoder` in eval mode (CPU, float32). Raises
    :class:`mmv_jax.export.ExportError` naming the file for a folder that is not an export or
    weights that do not match its config."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ex.ExportError(f"{folder!r}: no such folder")
    conf = ex.read_config(folder)
    model = TorchEncoder(conf, attn_impl=attn_impl)
    state = ex.read_weights(folder)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != state[k].shape)
    if missing or extra or shapes:
        raise ex.ExportError(
            f"{os.path.join(folder, ex.WEIGHTS)} does not match config.json: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {shapes[:5]}"
        )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()
