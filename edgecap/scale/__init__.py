"""Scale-out on Ray (`pip install 'edgecap[serve]'`): `caption-serve` (Ray Serve) and `caption-batch` (Ray Data).

Both run the torch-free runtime's Captioner inside Ray actors; the same commands run on one machine (a local
Ray instance) or a cluster (`--address auto` or HOST:PORT).
"""
