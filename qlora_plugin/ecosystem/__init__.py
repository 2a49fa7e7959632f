"""What the plugin knows about the libraries and the machine it runs with: the supported releases and every private
access (`compat`), the device, engine and rank (`runtime`), bitsandbytes imported without Hub code (`hub_code`) and
the library messages a run leaves out (`notices`).

It sits on `core`; no module of this folder imports another.
"""
