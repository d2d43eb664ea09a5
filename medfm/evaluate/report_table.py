"""An HTML table of generated reports a person can read: thumbnail, reference, generated text, baselines."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from medfm.atomic import write_text


def thumbnail_png(image: torch.Tensor, size: int = 128) -> bytes:
    """A grey PNG of a (C, H, W) image or the middle axial slice of a (C, X, Y, Z) volume."""
    x = torch.as_tensor(image).float()[0]
    if x.ndim == 3:
        x = x[..., x.shape[-1] // 2].T.flip(0)
    a = x.cpu().numpy()
    lo, hi = np.percentile(a, (1, 99)) if a.size else (0.0, 1.0)
    a = (255 * np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)).astype(np.uint8)
    im = Image.fromarray(a)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def examples_html(images: Sequence[torch.Tensor], columns: dict[str, Sequence[str]], path: str | Path,
                  title: str = "") -> Path:
    """One row per example: the thumbnail, then one cell per entry of ``columns`` (reference, model,
    baselines); a self-contained file (images inlined)."""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in columns)
    rows = []
    for i, image in enumerate(images):
        src = base64.b64encode(thumbnail_png(image)).decode()
        cells = "".join(f"<td>{html.escape(str(v[i]))}</td>" for v in columns.values())
        rows.append(f'<tr><td><img src="data:image/png;base64,{src}"></td>{cells}</tr>')
    doc = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
           "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;"
           "max-width:28em}table{border-collapse:collapse}</style>"
           f"<h3>{html.escape(title)}</h3><table><tr><th>image</th>{head}</tr>{''.join(rows)}</table>")
    write_text(path, doc)
    return Path(path)
