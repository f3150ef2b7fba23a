# Sourced by bench/'s VM scripts (after IMG is set): start_target MTU joins aoeini here to aoetgt in
# namespace tgt at MTU and has vblade export a fresh 512 MiB $IMG there as e0.0 (pid in VB);
# stop_target removes all of it.
start_target() {
    ip netns add tgt
    ip link add aoeini type veth peer name aoetgt netns tgt
    ip link set aoeini mtu "$1" up
    ip -n tgt link set aoetgt mtu "$1" up
    truncate -s 512M "$IMG"
    ip netns exec tgt vblade 0 0 aoetgt "$IMG" > /tmp/vblade.log 2>&1 &
    VB=$!
}
stop_target() {
    kill "$VB" 2>/dev/null || true
    wait "$VB" 2>/dev/null || true
    ip netns del tgt 2>/dev/null || true
    rm -f "$IMG"
}
