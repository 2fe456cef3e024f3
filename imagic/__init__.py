"""imagic: edit a real photo from one sentence (Imagic, Kawar et al., CVPR 2023)."""

__version__ = "0.1.0"
