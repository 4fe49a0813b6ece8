"""The server's runtime: one `runtime.Runtime` object per process owns what the
process serves (the registry of loaded servables), how (its transports, front-end
pools, device supervisor) and its lifecycle (start, hot reload, drain, stop).

`mserve.server` is MindSpore's API over a default `Runtime`; the front-end and
device processes build their own in `frontend_role` and `device_role`. The modules
here are the lifecycle's steps: `config` (what to start), `loading` (servables and
their versions), `listeners` (REST, gRPC and health ports), `processes` (device
and front-end processes). Nothing is imported here, so that a module importing
`mserve.runtime.config` pulls in no more than that.
"""
