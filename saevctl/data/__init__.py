"""Image sources: folders, ImageFolder trees, path lists and the offline demo photos, with stable ids."""

from saevctl.data.images import ImageRecord, ImageSource, open_image, resolve_images

__all__ = ["ImageRecord", "ImageSource", "open_image", "resolve_images"]
