"""Qualcomm AI Hub hosted devices as farm devices.

A hub agent (``edgefarm agent hub``) registers each selected AI Hub device with the
coordinator as a device of its own and measures assignments with hub jobs
(:mod:`agent.hub.executor`). Only :mod:`agent.hub.api` imports the ``qai_hub`` client;
every other module here is light (the coordinator imports :mod:`agent.hub.bundle`).
"""
