"""Image sources: folders, ImageFolder trees, path lists, the offline demo photos, WebDataset tars and Hugging Face
datasets, with stable ids."""

from saevctl.data.images import ImageRecord, ImageSource, open_image, resolve_images

__all__ = ["ImageRecord", "ImageSource", "open_image", "resolve_images"]
