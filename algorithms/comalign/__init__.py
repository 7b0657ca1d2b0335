"""ComAlign (docs/methods/comalign.md), all in this package:
- method.py: the registered classifier (DomainBed, Dassl);
- head.py: the head network, similarities, fusions, training loss, chunked scoring;
- phrases.py: caption phrases (rules; spaCy when installed) and their text embeddings;
- regions.py: image regions, component views and their image embeddings
  (detector.py: the torchvision detector source);
- cache.py: the HDF5 component cache;
- data.py: pair sets and compositional sets, encoded through the cache;
- released.py: the authors' released head checkpoint and HDF5 embeddings, read as released;
- train.py, evaluate.py: `python -m algorithms.comalign.train` / `.evaluate`.
Importing the package imports only the method (method discovery): no spaCy, h5py or
detector code until they are used."""
from algorithms.comalign import method  # noqa: F401  (registers ComAlign)
