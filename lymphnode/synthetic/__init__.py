"""Made-up CAMELYON16-like slides, so that everything runs on a fresh machine without 700 GB of data.

A synthetic slide is a pyramidal tiled JPEG TIFF (OpenSlide ``generic-tiff``, 0.243 µm/px at level
0, like CAMELYON16's 40x scans) of H&E-stained lymph-node tissue, and, for tumor slides, an ASAP XML
file with the lesion outlines (group ``_0``) and normal islands inside them (group ``_2``).

What it draws, and why (the point is a segmentation task that is not trivial and has to generalise
across slides, as CAMELYON16's is):

- Tissue: one to three irregular lobes (smoothed random star polygons plus low-frequency noise) on a
  white background, a fibrous pink capsule along the edge, white fat vacuoles (clusters of round
  empty holes) inside. Stroma is eosin with an oriented fibrous texture.
- Normal node: densely packed small, dark, round lymphocyte nuclei, with the confounders real
  metastasis detectors trip over: follicles whose germinal centres hold larger, paler nuclei, and
  sinuses with sparse, pale, oval histiocyte nuclei in pink cytoplasm, plus spindle-shaped stromal
  nuclei.
- Metastases: irregular polygons inside the tissue (a few large and some small, isolated-tumour-cell
  sized ones) of crowded, large, pleomorphic, vesicular nuclei (pale interior, dark rim, nucleoli) in
  more abundant cytoplasm. Their mean colour is close to normal node's; they differ in texture.
  Some contain a normal island (an exclusion polygon) drawn as normal node.
- Slide-to-slide variation as between CAMELYON centres: haematoxylin and eosin stain vectors (hue and
  strength), overall stain amount, background tint, scanner blur, sensor noise, JPEG quality.
  Colour is rendered in optical density (Beer–Lambert: ``OD = c_H * v_H + c_E * v_E``,
  ``RGB = 255 * exp(-OD)``) so that a stain change acts as it does on real slides.

Rendering is vectorised: low-frequency fields are drawn at low resolution and resampled with OpenCV,
nuclei are stamped as small irregular polygons (``cv2.fillConvexPoly``) onto concentration maps,
and the slide is rendered in horizontal strips, so memory stays at about the size of the RGB image.
Everything comes from one seed: same seed, same bytes.

Modules, in the order a slide is made: :mod:`~lymphnode.synthetic.style` (stain and scanner),
:mod:`~lymphnode.synthetic.fields` (noise, textures, shapes), :mod:`~lymphnode.synthetic.layout`
(tissue, lesions, vacuoles, nuclei), :mod:`~lymphnode.synthetic.render` (optical density to RGB),
:mod:`~lymphnode.synthetic.slide` (one slide: :func:`make_slide`) and
:mod:`~lymphnode.synthetic.slideset` (a CAMELYON16-named set: :func:`generate_slides`).

``python -m lymphnode.synth`` (Hydra, ``conf/synth.yaml``) writes ``<out_dir>/slides/tumor_XXX.tif``,
``normal_XXX.tif`` and ``<out_dir>/annotations/tumor_XXX.xml`` (CAMELYON16 names) in parallel, with a
manifest so that a rerun skips finished slides and a rerun with another config refuses.
"""

from __future__ import annotations

from lymphnode.synthetic.slide import GENERATOR_VERSION, MIN_SIDE, SynthSlide, make_slide
from lymphnode.synthetic.slideset import MANIFEST_NAME, generate_slides, slide_names, slide_seed
from lymphnode.synthetic.style import CAMELYON_MPP, SlideStyle

__all__ = [
    "CAMELYON_MPP",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "MIN_SIDE",
    "SlideStyle",
    "SynthSlide",
    "generate_slides",
    "make_slide",
    "slide_names",
    "slide_seed",
]
