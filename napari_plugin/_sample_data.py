"""npe2 sample data: nilearn's MNI152 template with a gray-matter label (no downloads).

The T1 template (197x233x189 voxels, 1 mm, RAS) and its gray-matter probability
map ship inside nilearn; the label is the map thresholded at 0.5, the target of
spadkit's label-efficiency benchmark. A starting prediction from a fine-tuned
model will join them once fine-tuning lands.
"""

from __future__ import annotations

import numpy as np

from spadkit.demo import nilearn_file
from spadkit.io import read_volume
from spadkit.volume import LabelVolume

from ._reader import LayerData, image_layer, label_layer

GM_CLASSES = {0: "background", 1: "gray matter"}


def mni152_gray_matter() -> list[LayerData]:
    """The MNI152 T1 image and its gray-matter label (probability > 0.5) as two layers."""
    raw = read_volume(nilearn_file("t1"))
    t1 = raw.canonical().load()
    gm = read_volume(nilearn_file("gm")).canonical()
    probability = gm.numpy()[0].astype(np.float32)
    mask = probability / probability.max() > 0.5  # stored as 0..1 or 0..255 depending on the nilearn version
    label = LabelVolume(mask.astype(np.uint8), gm.affine, classes=GM_CLASSES)
    info = {"source": str(nilearn_file("t1")), "orientation": raw.orientation}
    return [image_layer(t1, "MNI152 T1", info), label_layer(label, "gray matter", {**info, "source": str(nilearn_file("gm"))})]
