"""Foresight: EHR -> MEDS events -> a generative model of patient timelines -> forecasts, behind a privacy gate."""

__version__ = "0.1.0"
