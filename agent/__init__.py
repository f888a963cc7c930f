"""The device agent (`fleet-agent`): verifies, loads and serves models on the device.

Installs with `pip install "edgefleet[agent]"`: no torch, no cloud dependencies.
"""
