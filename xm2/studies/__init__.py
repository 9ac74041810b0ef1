"""Studies: experiments made of many tracked training runs (coordinate check, µTransfer sweep,
wind tunnel, decay study). Each module holds one experiment; :mod:`xm2.studies.tracked` holds
what they share (MLflow parent/child runs, metrics, figures)."""
