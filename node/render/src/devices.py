"""Run by `blender -b --factory-startup --python-expr`: prints the compute devices this Blender's
Cycles can use, whether it has OpenImageDenoise, and whether it has sample_offset, as one line
"@blendnet {"devices": {...}}". Embedded in the blendnet binary (node/render/src/devices.rs)."""
import json
import bpy
import _cycles

cpu = "CPU"
gpus = []
for kind in ("CUDA", "OPTIX", "HIP", "METAL", "ONEAPI"):
    try:
        found = _cycles.available_devices(kind)
    except Exception:
        continue
    for device in found:
        name, dtype = device[0], device[1]
        if dtype == "CPU":
            cpu = name
        elif {"kind": dtype, "name": name} not in gpus:
            gpus.append({"kind": dtype, "name": name})
print("@blendnet " + json.dumps({"devices": {
    "devices": [{"kind": "CPU", "name": cpu}] + gpus,
    "denoiser": bool(getattr(_cycles, "with_openimagedenoise", False)),
    "sample_offset": hasattr(bpy.context.scene.cycles, "sample_offset"),
}}), flush=True)
