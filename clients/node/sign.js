// Signs webhook requests the way Twilio does, with twilio-node's own
// helpers, for cacheproxy's webhook tests (internal/webhooks). Reads one
// JSON object on stdin:
//   {"token": "...", "url": "https://...", "params": {"K": "V", ...}}  form-encoded
//   {"token": "...", "url": "https://...", "body": "<JSON text>"}       JSON (bodySHA256)
// and prints {"url": <the URL to call>, "signature": <X-Twilio-Signature>}.
// For a JSON body the URL gains bodySHA256 (getExpectedBodyHash), and the
// result is checked with validateRequestWithBody before it is printed.
'use strict';
const twilio = require('twilio');

let input = '';
process.stdin.on('data', (c) => { input += c; });
process.stdin.on('end', () => {
  const req = JSON.parse(input);
  let url = req.url;
  let signature;
  if (req.body !== undefined) {
    url += (url.includes('?') ? '&' : '?') + 'bodySHA256=' + twilio.getExpectedBodyHash(req.body);
    signature = twilio.getExpectedTwilioSignature(req.token, url, {});
    if (!twilio.validateRequestWithBody(req.token, signature, url, req.body)) {
      throw new Error('twilio-node does not accept its own signature');
    }
  } else {
    signature = twilio.getExpectedTwilioSignature(req.token, url, req.params || {});
  }
  process.stdout.write(JSON.stringify({ url, signature }));
});
