"""Notebook front-ends (ipywidgets + matplotlib): the one spadkit package that imports them.

Needs the ``notebooks`` extra (``pip install "spadkit[notebooks]"``). Nothing
else in spadkit imports this package, so the library stays free of widget
toolkits.

Example (in JupyterLab)::

    from spadkit.io import read_label, read_volume
    from spadkit.notebook import Annotator, SliceViewer

    SliceViewer(read_volume("t1.nii.gz"), label=read_label("seg.nii.gz"))
    Annotator(session)          # correct slices of an AnnotationSession and learn from them
"""

from spadkit.notebook.annotate import Annotator
from spadkit.notebook.viewer import AXES, SliceViewer

__all__ = ["AXES", "Annotator", "SliceViewer"]
