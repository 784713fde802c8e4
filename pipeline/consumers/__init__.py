"""Consumers of exported schedules outside this project's own sampler.

``pipeline.consumers.diffusers_scheduler.LD3Scheduler`` (imports diffusers; import that module explicitly)
runs an export inside any diffusers pipeline, decoupled schedules included. Importing this package imports
nothing beyond the standard library.
"""
