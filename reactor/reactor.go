package reactor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/message"
)

// Deliverer hands one message to a program, booting it if needed.
type Deliverer interface {
	Deliver(ctx context.Context, ref message.ItemHash, event []byte) error
}

// Options configure a reactor.
type Options struct {
	// APIServer is the core node whose feed is read (its
	// /api/ws0/messages websocket).
	APIServer string
	Deliver   Deliverer
	Log       *slog.Logger
}

// Bounds of the reactor: deliveries waiting (more are dropped and
// counted), deliveries at once, frames kept for duplicates, the feed's
// frame size, its reconnections.
const (
	queueSize     = 256
	workers       = 4
	seenSize      = 4096
	maxFrame      = 2 << 20
	firstRetry    = 100 * time.Millisecond
	maxRetry      = 8 * time.Second
	resumeOverlap = time.Minute
	pingEvery     = 30 * time.Second
	deliverBound  = 2 * time.Minute
)

// Stats count what the reactor did.
type Stats struct {
	Messages, Delivered, Failed, Dropped uint64
	Subscribers                          int
}

// Reactor is the node's reactor.
type Reactor struct {
	opts  Options
	queue chan job

	mu    sync.Mutex
	subs  map[message.ItemHash]program
	seen  map[string]bool
	order []string
	last  float64 // the time of the last message read, for a resumption
	stats Stats
}

// program is a subscribing program: its owner and subscriptions.
type program struct {
	sender string
	subs   []map[string]any
}

type job struct {
	ref   message.ItemHash
	event []byte
}

// New returns a reactor that knows no subscription yet.
func New(opts Options) *Reactor {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	return &Reactor{opts: opts, queue: make(chan job, queueSize), subs: map[message.ItemHash]program{}, seen: map[string]bool{}}
}

// Stats returns the counters.
func (r *Reactor) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats
	s.Subscribers = len(r.subs)
	return s
}

// Run reads the feed and delivers until ctx ends, reconnecting (0.1 s,
// doubling to 8 s) whenever the feed ends.
func (r *Reactor) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.work(ctx)
		}()
	}
	defer wg.Wait()
	wait := firstRetry
	var warned time.Time
	for ctx.Err() == nil {
		read, err := r.follow(ctx)
		if ctx.Err() != nil {
			return
		}
		if read > 0 {
			wait = firstRetry
		}
		if time.Since(warned) > time.Minute {
			r.opts.Log.Warn("the core node's message feed ended; reconnecting", "err", err, "in", wait)
			warned = time.Now()
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
		wait = min(2*wait, maxRetry)
	}
}

// feedURL is the feed's address, starting a little before the last
// message read (the reference starts again from its first start).
func (r *Reactor) feedURL() (string, error) {
	u, err := url.Parse(strings.TrimSuffix(r.opts.APIServer, "/") + "/api/ws0/messages")
	if err != nil {
		return "", fmt.Errorf("API_SERVER: %w", err)
	}
	switch u.Scheme {
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	}
	r.mu.Lock()
	start := r.last - resumeOverlap.Seconds()
	r.mu.Unlock()
	if r.last == 0 {
		start = float64(time.Now().Unix())
	}
	u.RawQuery = url.Values{"startDate": {strconv.FormatInt(int64(math.Floor(start)), 10)}}.Encode()
	return u.String(), nil
}

// follow reads one connection of the feed; it returns how many frames it
// read and why it ended.
func (r *Reactor) follow(ctx context.Context) (int, error) {
	u, err := r.feedURL()
	if err != nil {
		return 0, err
	}
	dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	conn, _, err := websocket.Dial(dialCtx, u, nil)
	cancel()
	if err != nil {
		return 0, fmt.Errorf("connect to the message feed: %w", err)
	}
	defer conn.CloseNow()
	conn.SetReadLimit(maxFrame)
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(pingEvery):
				pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				err := conn.Ping(pctx)
				cancel()
				if err != nil {
					conn.CloseNow() // a feed that stopped answering
					return
				}
			}
		}
	}()
	n := 0
	for {
		kind, data, err := conn.Read(ctx)
		if err != nil {
			return n, err
		}
		n++
		if kind == websocket.MessageText {
			r.Handle(data)
		}
	}
}

// Register keeps the subscriptions of a PROGRAM message the node already
// has (its store's, at start): the reference knows only those it sees on
// the feed after it starts.
func (r *Reactor) Register(raw []byte) {
	msg, err := message.Parse(raw)
	if err != nil {
		return
	}
	if c, ok := msg.Content.(*message.ProgramContent); ok && len(c.On.Message) > 0 {
		r.mu.Lock()
		r.subs[msg.ItemHash] = program{sender: msg.Sender, subs: c.On.Message}
		r.mu.Unlock()
	}
}

// Handle takes one frame of the feed: a PROGRAM with subscriptions is
// registered, a FORGET of one unregisters it, and the message is
// delivered to every program one of whose subscriptions it matches, once.
func (r *Reactor) Handle(frame []byte) {
	var doc map[string]any
	if json.Unmarshal(frame, &doc) != nil {
		return
	}
	if _, ok := doc["item_type"]; !ok {
		return // confirmations and other notices are not messages
	}
	msg, err := message.Parse(frame)
	if err != nil {
		r.opts.Log.Debug("invalid message on the feed", "err", err)
		return
	}
	hash := string(msg.ItemHash)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen[hash] {
		return
	}
	r.seen[hash] = true
	r.order = append(r.order, hash)
	if len(r.order) > seenSize {
		delete(r.seen, r.order[0])
		r.order = r.order[1:]
	}
	r.stats.Messages++
	if t, ok := doc["time"].(float64); ok && t > r.last {
		r.last = t
	}
	switch c := msg.Content.(type) {
	case *message.ProgramContent:
		if len(c.On.Message) > 0 {
			r.subs[msg.ItemHash] = program{sender: msg.Sender, subs: c.On.Message}
		}
	case *message.ForgetContent:
		for _, h := range c.Hashes {
			if p, ok := r.subs[h]; ok && strings.EqualFold(p.sender, msg.Sender) {
				delete(r.subs, h)
			}
		}
	}
	for ref, p := range r.subs {
		for _, sub := range p.subs {
			if !Matches(sub, doc) {
				continue
			}
			select {
			case r.queue <- job{ref: ref, event: frame}:
			default:
				r.stats.Dropped++
			}
			break // once per program
		}
	}
}

func (r *Reactor) work(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case j := <-r.queue:
			dctx, cancel := context.WithTimeout(ctx, deliverBound)
			err := r.opts.Deliver.Deliver(dctx, j.ref, j.event)
			cancel()
			r.mu.Lock()
			if err != nil {
				r.stats.Failed++
			} else {
				r.stats.Delivered++
			}
			r.mu.Unlock()
			if err != nil && !errors.Is(err, context.Canceled) {
				r.opts.Log.Warn("deliver a message to a program", "ref", j.ref, "err", err)
			} else if err == nil {
				r.opts.Log.Info("message delivered to a program", "ref", j.ref)
			}
		}
	}
}
