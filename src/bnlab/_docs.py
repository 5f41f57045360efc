"""Docstring paragraphs shared by the layers, inserted once per 1d/2d/3d class."""

from __future__ import annotations

COMMON_ARGS = """\
    num_features: ``C``, the number of channels.
    eps: added to the variance for numerical stability. Default: ``1e-5``.
    momentum: weight of the new batch in the moving average (PyTorch convention), or ``None``
        for a cumulative average. Default: ``0.1``.
    affine: learn ``weight`` (:math:`\\gamma`) and ``bias`` (:math:`\\beta`). Default: ``True``."""

FACTORY_ARGS = """\
    bias, running, window_size, nonfinite: as in :class:`bnlab.BatchNorm2d` (keyword-only).
    device, dtype: factory arguments for the parameters and buffers."""

SHAPE = """\
Shape:
    - Input: {layout}
    - Output: same shape and dtype as the input."""

EXAMPLE_IMPORTS = """
    >>> import torch, bnlab"""

#: per input rank (the class's ``_input_dims``): how the docs name it and an example shape
_EXAMPLES = {
    (2, 3): ("2D or 3D", "8, 3"),
    (4,): ("4D", "8, 3, 5, 5"),
    (5,): ("5D", "8, 3, 2, 4, 4"),
}


def fill_docs(doc: str, *classes: type) -> None:
    """Format ``doc`` for each class, from its input layout (``_input_dims``)."""
    for cls in classes:
        rank, shape = _EXAMPLES[cls._input_dims]  # type: ignore[attr-defined]
        cls.__doc__ = doc.format(
            name=cls.__name__,
            rank=rank,
            layout=cls._input_layout,  # type: ignore[attr-defined]
            example_shape=shape,
            shape=SHAPE.format(layout=cls._input_layout),  # type: ignore[attr-defined]
            example_imports=EXAMPLE_IMPORTS,
            common_args=COMMON_ARGS,
            factory_args=FACTORY_ARGS,
        )
