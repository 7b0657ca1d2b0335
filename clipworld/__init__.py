"""The generated dataset, CLIPWorld: coloured shapes in four domains with captions and
masks (`generate`), and its forms for the harnesses: a Dassl dataset (`dassl_dataset`)
and a DomainBed dataset (`domainbed_dataset`)."""
