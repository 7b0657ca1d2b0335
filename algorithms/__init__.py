"""CLIP alignment and robustness methods, one module each; shared by the DomainBed
(algorithms/domainbed_plugin.py) and Dassl/CoOp (trainers/) adapters.
Kept import-light: the interpreter-start hook imports this package."""
