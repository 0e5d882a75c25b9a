"""Imaging: what an image file is, and the studio path's pixels.

- `libraries`: libvips's process-wide settings, applied once at daemon start.
- `containers`: the byte structure of image files (nothing decodes a pixel).
- `inspect`: what a file is, whether the API takes it as it is, whether an answer is sound.
- `compose`: the proxy sent to the API and the full-resolution cut-out.
- `metadata`: EXIF, XMP, IPTC and ICC, read from an original and carried into results.
- `recipes`: output recipes, steps on a cut-out between composing and writing.
"""
