/* The thread pool engine of BlkAio: where io_uring is missing or forbidden, each request is
 * a job for one of POOL_THREADS workers doing the blocking preadv/pwritev/fdatasync. Jobs
 * start in submission order; a flush is a barrier (it starts once every running job ended,
 * and nothing starts while it runs), as IOSQE_IO_DRAIN makes it on io_uring. A finished job
 * goes on the done list and the engine's eventfd is signalled. */
#include "_aio.h"

#include <errno.h>
#include <unistd.h>

static long long do_io(aioreq *r)
{
    ssize_t n;
    if (r->kind == BLK_T_FLUSH) {
        int rc;
        do
            rc = fdatasync(r->fd);
        while (rc < 0 && errno == EINTR);
        return rc < 0 ? -errno : 0;
    }
    do
        n = r->kind == BLK_T_IN ? preadv(r->fd, r->iov, r->iovcnt, (off_t)r->off)
                                : pwritev(r->fd, r->iov, r->iovcnt, (off_t)r->off);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

static void *pool_worker(void *arg)
{
    BlkAio *a = arg;
    uint64_t one = 1;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        /* A flush at the head waits for every running request; while it runs, nothing else. */
        while (!a->stop && (a->qhead == NULL || a->barrier ||
                            (a->qhead->kind == BLK_T_FLUSH && a->running > 0)))
            pthread_cond_wait(&a->cv, &a->mu);
        if (a->stop)
            break;
        aioreq *r = a->qhead;
        if (!(a->qhead = r->next))
            a->qtail = NULL;
        a->running++;
        a->barrier = r->kind == BLK_T_FLUSH;
        pthread_mutex_unlock(&a->mu);
        r->res = do_io(r);
        pthread_mutex_lock(&a->mu);
        a->running--;
        a->barrier = 0;
        r->next = a->done;
        a->done = r;
        pthread_cond_broadcast(&a->cv);
        pthread_cond_signal(&a->cv_done);
        (void)!write(a->efd, &one, sizeof one);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

int pool_start(BlkAio *a)
{
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    pthread_cond_init(&a->cv_done, NULL);
    for (; a->nthreads < POOL_THREADS; a->nthreads++)
        if (pthread_create(&a->th[a->nthreads], NULL, pool_worker, a) != 0)
            break;
    return a->nthreads > 0 ? 0 : -1;
}

void pool_queue(BlkAio *a, aioreq *r)
{
    pthread_mutex_lock(&a->mu);
    r->next = NULL;
    if (a->qtail)
        a->qtail->next = r;
    else
        a->qhead = r;
    a->qtail = r;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
}


aioreq *pool_take(BlkAio *a, int wait)
{
    pthread_mutex_lock(&a->mu);
    while (wait && a->done == NULL)
        pthread_cond_wait(&a->cv_done, &a->mu);
    aioreq *list = a->done;
    a->done = NULL;
    pthread_mutex_unlock(&a->mu);
    return list;
}

void pool_stop(BlkAio *a)
{
    if (!a->nthreads)
        return;
    pthread_mutex_lock(&a->mu);
    a->stop = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    for (int i = 0; i < a->nthreads; i++)
        pthread_join(a->th[i], NULL);
    a->nthreads = 0;
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    pthread_cond_destroy(&a->cv_done);
}
