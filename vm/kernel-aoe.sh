# Sourced by VM scripts: kernel_aoe_attach IFACE DEVICE loads the kernel's own aoe driver ($AOE_KO,
# see vm/run) on IFACE and waits up to 20 s for /dev/etherd/DEVICE; fails if it does not appear.
kernel_aoe_attach() {
    insmod "$AOE_KO" aoe_iflist="$1"
    for _ in $(seq 100); do
        echo > /dev/etherd/discover 2>/dev/null || true
        [ -b "/dev/etherd/$2" ] && return 0
        sleep 0.2
    done
    return 1
}
