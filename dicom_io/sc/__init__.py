"""Secondary Capture images we write: the radiograph with one finding's heatmap burned in."""

from dicom_io.sc.heatmap import HEATMAP_BANNER, HeatmapCapture, build_heatmap_capture

__all__ = ["HEATMAP_BANNER", "HeatmapCapture", "build_heatmap_capture"]
