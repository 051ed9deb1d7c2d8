"""The runtime both sides share, apart from the I/O-free core.

Installed as ``remote_exec.runtime``: the instance runtime (instances, their
FIFOs and worker threads, the calls running on them, events) and the byte
streams, transports and tokens the executors and the server talk through;
``backend`` is the one module that asks which async library runs.
"""
