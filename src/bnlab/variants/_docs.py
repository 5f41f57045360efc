"""Docstring paragraphs shared by the variant layers, inserted once per 1d/2d/3d class."""

from __future__ import annotations

COMMON_ARGS = """\
    num_features: ``C``, the number of channels.
    eps: added to the variance for numerical stability. Default: ``1e-5``.
    momentum: weight of the new batch in the moving average (PyTorch convention), or ``None``
        for a cumulative average. Default: ``0.1``.
    affine: learn ``weight`` (:math:`\\gamma`) and ``bias`` (:math:`\\beta`). Default: ``True``."""

FACTORY_ARGS = """\
    device, dtype: factory arguments for the parameters and buffers."""

RANKS = (
    ("1d", "2D or 3D", "(N, C) or (N, C, L)", "8, 3"),
    ("2d", "4D", "(N, C, H, W)", "8, 3, 5, 5"),
    ("3d", "5D", "(N, C, D, H, W)", "8, 3, 2, 4, 4"),
)


def fill_docs(doc: str, classes: dict[str, type]) -> None:
    """Format ``doc`` for each class in ``{"1d": cls, "2d": cls, "3d": cls}``."""
    for suffix, rank, layout, shape in RANKS:
        cls = classes[suffix]
        cls.__doc__ = doc.format(
            name=cls.__name__,
            rank=rank,
            layout=layout,
            example_shape=shape,
            common_args=COMMON_ARGS,
            factory_args=FACTORY_ARGS,
        )
