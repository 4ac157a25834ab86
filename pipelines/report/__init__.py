"""`stl-labels report`: token-label quality numbers, histograms and pictures for one labeler in a store."""
from pipelines.report.build import ReportConfig, build_report

__all__ = ["ReportConfig", "build_report"]
