// Package twilioerr writes errors in the JSON shape Twilio's SDKs decode:
// {"code":..,"message":..,"more_info":..,"status":..}. Codes are 20000 +
// the HTTP status (20404, 20429 as Twilio uses them).
package twilioerr

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Write answers with status and Twilio's error body for msg.
func Write(w http.ResponseWriter, status int, msg string) {
	body := Body(status, msg)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// Body is the error body for status with message msg. It is always valid
// JSON, whatever msg holds (control characters, invalid UTF-8: a message
// may quote a client's path).
func Body(status int, msg string) []byte {
	code := strconv.Itoa(20000 + status)
	m, _ := json.Marshal(msg) // a string always marshals
	b := make([]byte, 0, 96+len(m))
	b = append(b, `{"code":`...)
	b = append(b, code...)
	b = append(b, `,"message":`...)
	b = append(b, m...)
	b = append(b, `,"more_info":"https://www.twilio.com/docs/errors/`...)
	b = append(b, code...)
	b = append(b, `","status":`...)
	b = strconv.AppendInt(b, int64(status), 10)
	return append(b, '}')
}
