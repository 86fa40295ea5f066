package twilioerr

import (
	"encoding/json"
	"testing"
)

func TestBodyIsValidJSONWhateverTheMessage(t *testing.T) {
	for _, msg := range []string{"plain", "no route for /nope\x00", "bad \xff byte", `quote " and \ backslash`, "<html>&"} {
		b := Body(404, msg)
		var e struct {
			Code     int    `json:"code"`
			Message  string `json:"message"`
			MoreInfo string `json:"more_info"`
			Status   int    `json:"status"`
		}
		if !json.Valid(b) || json.Unmarshal(b, &e) != nil || e.Code != 20404 || e.Status != 404 || e.MoreInfo != "https://www.twilio.com/docs/errors/20404" || e.Message == "" {
			t.Errorf("%q: %s", msg, b)
		}
	}
}
