"""The model registry's rules, apart from serving (ours).

- gate.py: the pure promotion gate (champion / challenger) and which variant `register.variant` names;
- tracking.py: the tracking server / registry connection (register, `mofe score`, the benches);
- versions.py: the registry read back (`mofe registry`, model references checked before a download).
The register stage applies them; serving only reads a registered model.
"""
