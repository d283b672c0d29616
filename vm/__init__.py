"""The libvirt/QEMU VM pair: boot assets, domain XML, pair lifecycle."""
