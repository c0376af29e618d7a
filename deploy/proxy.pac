// Proxy auto-config for egress-guard. Serve it from an intranet web server and set it in the
// browsers' or the OS's "automatic proxy configuration URL" (or by GPO / MDM / WPAD).
// Intranet names and private networks go direct; everything else through the gateway.
function FindProxyForURL(url, host) {
  if (isPlainHostName(host) ||
      dnsDomainIs(host, ".corp.example") ||
      isInNet(dnsResolve(host), "10.0.0.0", "255.0.0.0") ||
      isInNet(dnsResolve(host), "172.16.0.0", "255.240.0.0") ||
      isInNet(dnsResolve(host), "192.168.0.0", "255.255.0.0") ||
      isInNet(dnsResolve(host), "127.0.0.0", "255.0.0.0")) {
    return "DIRECT";
  }
  // No "; DIRECT" fallback: if the gateway is down, traffic must not bypass it.
  return "PROXY gateway.corp.example:8080";
}
