#!/bin/sh
# Print the JAX build this machine needs: cuda13, cuda12, tpu or cpu (what `make install`
# installs when JAX_ACCELERATOR=auto, the default; see README "Accelerators").
#   NVIDIA GPU: `nvidia-smi` answers. Driver ≥ 580 runs CUDA 13 wheels, older ones CUDA 12.
#   TPU VM:     /dev/accel* (v2–v4) or /dev/vfio/* with a Google TPU on the PCI bus (v5e and
#               later), or the TPU runtime's environment (TPU_ACCELERATOR_TYPE, TPU_NAME).
#   otherwise:  cpu.
if command -v nvidia-smi >/dev/null 2>&1; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    major=${driver%%.*}
    case "$major" in
        ''|*[!0-9]*) ;;                       # nvidia-smi present but no GPU answered
        *) if [ "$major" -ge 580 ]; then echo cuda13; else echo cuda12; fi; exit 0 ;;
    esac
fi
if ls /dev/accel* >/dev/null 2>&1 || [ -n "${TPU_ACCELERATOR_TYPE:-}" ] || [ -n "${TPU_NAME:-}" ]; then
    echo tpu; exit 0
fi
if [ -d /dev/vfio ] && grep -qs 0x1ae0 /sys/bus/pci/devices/*/vendor; then
    echo tpu; exit 0                           # 0x1ae0: Google (TPU v5e and later via VFIO)
fi
echo cpu
