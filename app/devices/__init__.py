"""Device processes: one process per device (or device group) holds the models.

    front-end processes (HTTP, codec, Python stages)        device processes
    ------------------------------------------------        ----------------
    RemoteModelStage / RemoteBatcher  --- unix socket --->   DeviceServer
      (remote.py)        descriptors (channel.py)             (process.py): the models,
      arrays in a per-connection shared-memory                 compiled buckets, one
      buffer (shm.py) <------------------------------------>   Batcher per model stage

`supervisor.py` starts, restarts and stops the device processes and publishes what
they serve in a manifest file that the front-ends follow (`manifest.py`).
"""
