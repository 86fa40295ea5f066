package ratelimit

import (
	"slices"
	"time"
)

// fairQueue is one priority's waiting calls of an account, queued per
// credential and served round-robin across credentials.
type fairQueue struct {
	creds map[string]*credQueue // waiting calls by credential
	ring  []*credQueue          // credentials with waiting calls, served in turn
	next  int                   // index in ring served next
	n     int                   // waiting calls
}

type credQueue struct {
	id      string
	waiters []*waiter
}

type waiter struct {
	cred       *credQueue
	credential string // its own (cred may be the unverified queue)
	prio       Priority
	start      time.Time  // its request's arrival: MaxWait counts from it
	asked      time.Time  // its Acquire: Waited counts from it
	reply      chan grant // buffered 1: nobody blocks sending on it

	// Set when granted a turn (under the Limiter's lock): the cap then,
	// and whether it is the account's one unverified turn.
	limit      int
	unverified bool
}

// grant is a turn (err nil) or a refusal for a waiting call.
type grant struct {
	err error
}

// push queues w under credential: a new credential joins the rotation
// just before the one served next, so it waits at most one round.
func (q *fairQueue) push(credential string, w *waiter) {
	if q.creds == nil {
		q.creds = map[string]*credQueue{}
	}
	c := q.creds[credential]
	if c == nil {
		c = &credQueue{id: credential}
		q.creds[credential] = c
		q.ring = slices.Insert(q.ring, q.next, c)
		q.next++
		if q.next == len(q.ring) {
			q.next = 0
		}
	}
	w.cred = c
	c.waiters = append(c.waiters, w)
	q.n++
}

// pushFront puts w back at the head of its credential's queue, which is
// served next (a turn the rate window sent back).
func (q *fairQueue) pushFront(credential string, w *waiter) {
	q.push(credential, w)
	c := w.cred
	copy(c.waiters[1:], c.waiters[:len(c.waiters)-1])
	c.waiters[0] = w
	q.next = slices.Index(q.ring, c)
}

// pop takes the next waiting call in round-robin order, passing over the
// unverified queue when skipUnverified; nil if nothing else waits.
func (q *fairQueue) pop(skipUnverified bool) *waiter {
	if q.n == 0 {
		return nil
	}
	if q.ring[q.next].id == unverifiedQueue && skipUnverified {
		if len(q.ring) == 1 {
			return nil
		}
		if q.next++; q.next == len(q.ring) {
			q.next = 0
		}
	}
	c := q.ring[q.next]
	w := c.waiters[0]
	c.waiters[0] = nil
	c.waiters = c.waiters[1:]
	q.n--
	if len(c.waiters) == 0 {
		q.drop(q.next)
	} else {
		q.next++
	}
	if q.next >= len(q.ring) {
		q.next = 0
	}
	return w
}

// drop removes the empty credential queue at ring index i.
func (q *fairQueue) drop(i int) {
	delete(q.creds, q.ring[i].id)
	q.ring = slices.Delete(q.ring, i, i+1)
	if i < q.next {
		q.next--
	}
	if q.next >= len(q.ring) {
		q.next = 0
	}
}

// remove takes w out of the queue; false if it was not there.
func (q *fairQueue) remove(w *waiter) bool {
	c := w.cred
	if c == nil || q.creds[c.id] != c {
		return false
	}
	i := slices.Index(c.waiters, w)
	if i < 0 {
		return false
	}
	c.waiters = slices.Delete(c.waiters, i, i+1)
	q.n--
	if len(c.waiters) == 0 {
		q.drop(slices.Index(q.ring, c))
	}
	return true
}

// longest is the credential queue with the most waiting calls.
func (q *fairQueue) longest() *credQueue {
	var l *credQueue
	for _, c := range q.ring {
		if l == nil || len(c.waiters) > len(l.waiters) {
			l = c
		}
	}
	return l
}

func (q *fairQueue) waiting(credential string) int {
	if c := q.creds[credential]; c != nil {
		return len(c.waiters)
	}
	return 0
}
