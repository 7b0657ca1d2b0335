"""The harness inside an unmodified DomainBed: its methods become DomainBed algorithms,
its datasets DomainBed datasets, its launchers DomainBed launchers, and a few upstream
behaviours are fixed. Nothing is edited upstream; `hook` patches DomainBed's modules as
they are imported (in every process: sweep, train subprocesses, collect_results), with
the functions listed in `patches.PATCHES`. third_party/README.md explains each change.

- `hook`: the import finder (installed by the .pth line third_party/install.py writes);
- `patches`: the patch table, one entry per patched DomainBed module;
- `methods`: harness methods as DomainBed algorithms, their hyperparameters;
- `data`: CLIP preprocessing and class names for image-folder datasets, the held-out
  data of the selection protocol, and the upstream data fixes.
"""
