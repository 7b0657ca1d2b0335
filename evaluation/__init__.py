"""Analyses that run models on finished jobs and write records for the collector
(results/): they run on the device and precision they are asked for, never those a job
recorded. `python -m evaluation.domain_gap` is the domain-gap analysis of DomainBed jobs."""
