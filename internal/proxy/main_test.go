package proxy

import (
	"testing"

	"cacheproxy/internal/nodetest"
)

// TestMain refuses to run without what the real-client tests need (node
// and the npm packages of clients/node): `bash .ci/run` installs them.
func TestMain(m *testing.M) { nodetest.Main(m, "internal/proxy") }
