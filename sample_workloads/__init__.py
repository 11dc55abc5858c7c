"""The sample workloads, installed as gemel_studio.sample_workloads; read through gemel_studio.samples."""
