"""Sweeps over the method grid from one calibration pass."""
