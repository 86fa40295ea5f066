// Drives twilio-node through cacheproxy, replacing each domain's baseUrl and
// using a custom httpClient that records what the sidecar answered.
// cacheproxy's Go tests run it (internal/proxy/twilionode_test.go) with:
//   CACHEPROXY_URL, ACCOUNT_SID, AUTH_TOKEN, CONV, MEMBER, ISVC, CONV2,
//   MEMBER2, KSVC, SESSION, KP
'use strict';
const assert = require('node:assert/strict');
const twilio = require('twilio');

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`missing environment variable ${k}`);
  return v;
};

// A custom httpClient: the default one, recording each answer's Cache-Status.
class RecordingClient extends twilio.RequestClient {
  constructor() {
    super();
    this.seen = [];
  }
  async request(opts) {
    const res = await super.request(opts);
    this.seen.push({ method: opts.method, uri: opts.uri, status: res.statusCode, cacheStatus: res.headers['cache-status'] || '' });
    return res;
  }
}

async function main() {
  const base = env('CACHEPROXY_URL');
  const http = new RecordingClient();
  const client = twilio(env('ACCOUNT_SID'), env('AUTH_TOKEN'), { httpClient: http });
  client.conversations.baseUrl = `${base}/conversations`;
  client.proxy.baseUrl = `${base}/proxy`;

  const conv = env('CONV'), member = env('MEMBER');
  for (let i = 0; i < 2; i++) {
    const p = await client.conversations.v1.conversations(conv).participants(member).fetch();
    assert.equal(p.sid, member);
    assert.equal(p.conversationSid, conv);
    assert.equal(p.accountSid, env('ACCOUNT_SID'));
  }
  for (let i = 0; i < 2; i++) {
    const p = await client.conversations.v1.services(env('ISVC')).conversations(env('CONV2')).participants(env('MEMBER2')).fetch();
    assert.equal(p.sid, env('MEMBER2'));
    assert.equal(p.chatServiceSid, env('ISVC'));
  }
  for (let i = 0; i < 2; i++) {
    const p = await client.proxy.v1.services(env('KSVC')).sessions(env('SESSION')).participants(env('KP')).fetch();
    assert.equal(p.sid, env('KP'));
    assert.equal(p.sessionSid, env('SESSION'));
  }
  // Each pair: a miss, then a hit.
  for (let i = 0; i < 6; i += 2) {
    assert.match(http.seen[i].cacheStatus, /^cacheproxy; fwd=uri-miss; stored/, JSON.stringify(http.seen[i]));
    assert.match(http.seen[i + 1].cacheStatus, /^cacheproxy; hit; ttl=/, JSON.stringify(http.seen[i + 1]));
  }
  // An update through the sidecar is seen by the next fetch.
  await client.conversations.v1.conversations(conv).participants(member).update({ attributes: '{"v":"node"}' });
  const after = await client.conversations.v1.conversations(conv).participants(member).fetch();
  assert.equal(after.attributes, '{"v":"node"}');
  // Twilio's 404 shape comes through as a RestException.
  await assert.rejects(
    client.conversations.v1.conversations(conv).participants('MB' + 'f'.repeat(32)).fetch(),
    (e) => e.status === 404 && e.code === 20404,
  );
  // A list auto-pages through next_page_url, as given: every page comes
  // back through the sidecar (LIST_COUNT participants, pages of 2).
  const listed = await client.conversations.v1.conversations(conv).participants.list({ pageSize: 2 });
  assert.equal(listed.length, Number(env('LIST_COUNT')));
  const pages = http.seen.filter((s) => s.uri.includes('/Participants?') || s.uri.endsWith('/Participants'));
  for (const pg of pages) {
    assert.ok(pg.uri.startsWith(base), `a page went around the sidecar: ${pg.uri}`);
  }
  // Listed again: every page is answered from the cache, the same records.
  const before = http.seen.length;
  const again = await client.conversations.v1.conversations(conv).participants.list({ pageSize: 2 });
  assert.deepEqual(again.map((p) => p.sid), listed.map((p) => p.sid));
  const second = http.seen.slice(before);
  assert.ok(second.length >= 3, `the second pass read ${second.length} pages`);
  for (const pg of second) {
    assert.match(pg.cacheStatus, /^cacheproxy; hit; ttl=/, JSON.stringify(pg));
  }
  // An update between passes is seen by the next one.
  await client.conversations.v1.conversations(conv).participants(member).update({ attributes: '{"v":"listed"}' });
  const third = await client.conversations.v1.conversations(conv).participants.list({ pageSize: 2 });
  assert.equal(third.find((p) => p.sid === member).attributes, '{"v":"listed"}');
  console.log(JSON.stringify({ ok: true, requests: http.seen.length, pages: pages.length }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
